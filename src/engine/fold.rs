//! Folding a large weight's preparation chain with one copy of it alive.
//!
//! tract's codegen wires each convolution's and matrix product's weight
//! through axis changes into a pack, and its constant folding then evaluates
//! that chain while the weight stays referenced by its `Const` node: the
//! first axis op copies the shared tensor and the pack makes a third buffer.
//! For the largest kernel of a UNet (118 MB) that spike sets the process's
//! peak memory. This pass runs ahead of tract's own folding, takes the weight
//! out of its node, so the axis changes work in place, and leaves at most
//! the weight and its packed form alive at once. The same pass records the
//! packed forms the compile cache saves, and puts the saved ones in place of
//! stand-ins on later starts (`packed`).

use std::collections::HashMap;
use std::sync::{Mutex, Weak};

use anyhow::Context;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::{AxisOp, IntoShape};
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::pack::{DynPackedExoticFact, OptMatMulPack};
use tract_onnx::tract_core::optim::{Optimizer, OptimizerSession, TypedPass};
use tract_onnx::tract_hir::internal::DimLike;

use super::packed::{self, MappedWeights, PackRequest, PackedWeight};

/// Weights below this are left to tract's own folding: small enough that an
/// extra copy does not matter, and a page each in a packed-weights file.
const MIN_WEIGHT_BYTES: usize = 16 << 10;

/// Where the folded weights come from and where their packed forms go,
/// shared with the pass (tract clones its passes between rounds).
#[derive(Default)]
pub enum Weights {
    /// Folded and forgotten: a graph built from ONNX.
    #[default]
    Anonymous,
    /// A graph read back from the cache: the packed form of each weight
    /// known by its NNEF label is kept, to be written next to the graph.
    Record {
        /// NNEF label and the shape the archive stores, by loaded tensor.
        labels: WeightNames<(String, Vec<usize>)>,
        packed: Vec<PackedWeight>,
    },
    /// A graph whose large weights are stand-ins: their packed forms come
    /// from the mapped file, and every stand-in must be replaced.
    Mapped {
        standins: WeightNames<String>,
        weights: MappedWeights,
        replaced: usize,
    },
}

impl Weights {
    /// True for a stand-in that only the packed form saved for tract's
    /// kernels replaces: the op using it must stay with tract.
    pub fn is_standin(&self, tensor: &Arc<Tensor>) -> bool {
        matches!(self, Weights::Mapped { standins, .. } if standins.get(tensor).is_some())
    }

    /// True when the pass and the weights agree: no stand-in is left in the plan.
    pub fn check_complete(&self) -> TractResult<()> {
        if let Weights::Mapped {
            standins, replaced, ..
        } = self
        {
            anyhow::ensure!(
                *replaced == standins.len(),
                "{} of {} stand-in weights were replaced by their packed form",
                replaced,
                standins.len()
            );
        }
        Ok(())
    }
}

/// Names of loaded weights by tensor identity. The weak reference keeps the
/// identity from being reused by another tensor without keeping the data
/// alive, so the pass can still take a weight out of its node.
pub struct WeightNames<T>(HashMap<usize, (Weak<Tensor>, T)>);

impl<T> Default for WeightNames<T> {
    fn default() -> Self {
        WeightNames(HashMap::new())
    }
}

impl<T> WeightNames<T> {
    pub fn insert(&mut self, tensor: &Arc<Tensor>, name: T) {
        let key = Arc::as_ptr(tensor) as usize;
        self.0.insert(key, (Arc::downgrade(tensor), name));
    }

    pub fn get(&self, tensor: &Arc<Tensor>) -> Option<&T> {
        let (weak, name) = self.0.get(&(Arc::as_ptr(tensor) as usize))?;
        (weak.as_ptr() == Arc::as_ptr(tensor)).then_some(name)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// True for a weight the pass folds.
pub fn is_large_weight(tensor: &Tensor) -> bool {
    tensor.is_plain() && tensor.len() * tensor.datum_type().size_of() >= MIN_WEIGHT_BYTES
}

/// True for a weight a packed-weights file may hold.
pub fn is_savable_weight(tensor: &Tensor) -> bool {
    tensor.datum_type() == f32::datum_type() && is_large_weight(tensor)
}

/// tract's codegen pipeline with the frugal fold ahead of its own.
pub fn codegen_optimizer(weights: Arc<Mutex<Weights>>) -> Optimizer {
    let mut optimizer = Optimizer::codegen();
    optimizer.add_pass(0, Box::new(FoldWeightPreparation { weights }));
    optimizer
}

#[derive(Clone)]
struct FoldWeightPreparation {
    weights: Arc<Mutex<Weights>>,
}

impl std::fmt::Debug for FoldWeightPreparation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FoldWeightPreparation")
    }
}

impl TypedPass for FoldWeightPreparation {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut OptimizerSession,
        _model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        Ok(None)
    }

    fn run_direct(&mut self, model: &mut TypedModel) -> TractResult<bool> {
        let candidates: Vec<String> = model
            .nodes
            .iter()
            .filter(|node| chain_after(model, node.id).is_some())
            .map(|node| node.name.clone())
            .collect();
        for name in &candidates {
            let id = model.node_id_by_name(name)?;
            if let Some(chain) = chain_after(model, id) {
                let mut weights = self
                    .weights
                    .lock()
                    .map_err(|_| anyhow::anyhow!("weights lock poisoned"))?;
                fold(model, id, &chain, &mut weights)?;
                model.compact()?;
            }
        }
        Ok(!candidates.is_empty())
    }
}

/// The preparation ops fed by a large, plain constant, in order, when it has
/// any; each of them the only consumer of the one before.
fn chain_after(model: &TypedModel, id: usize) -> Option<Vec<usize>> {
    let node = &model.nodes[id];
    let konst = node.op_as::<Const>()?;
    let tensor = konst.val();
    if konst.exotic_fact().is_some() || !is_large_weight(tensor) {
        return None;
    }
    let outputs = model.output_outlets().ok()?;
    let mut chain = vec![];
    let mut current = id;
    loop {
        if outputs.contains(&OutletId::new(current, 0)) {
            break;
        }
        let Ok(Some(succ)) = model.single_succ(current) else {
            break;
        };
        let preparation =
            succ.op_is::<AxisOp>() || succ.op_is::<IntoShape>() || succ.op_is::<OptMatMulPack>();
        if !preparation || succ.inputs.len() != 1 || succ.outputs.len() != 1 {
            break;
        }
        chain.push(succ.id);
        if succ.op_is::<OptMatMulPack>() {
            break;
        }
        current = succ.id;
    }
    (!chain.is_empty()).then_some(chain)
}

/// Evaluates `chain` on the weight of node `id`, moved out of the graph, and
/// wires the result as a constant in place of the chain's last node.
fn fold(
    model: &mut TypedModel,
    id: usize,
    chain: &[usize],
    weights: &mut Weights,
) -> TractResult<()> {
    let last = *chain.last().context("empty chain")?;
    let weight = model.nodes[id]
        .op_as::<Const>()
        .context("not a constant")?
        .val()
        .clone();
    let value = match weights {
        Weights::Mapped {
            standins,
            weights,
            replaced,
        } if standins.get(&weight).is_some() => {
            let label = standins.get(&weight).context("stand-in")?;
            let value = mapped(model, last, label, weights)?;
            drop(weight);
            take_weight(model, id)?;
            *replaced += 1;
            value
        }
        _ => {
            let record = match weights {
                Weights::Record { labels, .. } => labels.get(&weight).cloned(),
                _ => None,
            };
            drop(weight);
            let value = evaluate(model, id, chain)?;
            if let (Some((label, shape)), Weights::Record { packed, .. }) = (record, &mut *weights)
            {
                if packed::is_storable(&value) {
                    packed.push(PackedWeight {
                        label,
                        shape,
                        value: value.clone().into_arc_tensor(),
                    });
                }
            }
            value
        }
    };
    let exotic = model
        .outlet_fact(OutletId::new(last, 0))?
        .exotic_fact
        .clone();
    let konst = Const::new_with_opt_exotic_fact(value.into_arc_tensor(), exotic)?;
    let mut patch = TypedModelPatch::default();
    let wire = patch.wire_node(&model.nodes[last].name, konst, &[])?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), wire)?;
    patch.apply(model)
}

/// The chain evaluated on the weight of node `id`, moved out of the graph.
fn evaluate(model: &mut TypedModel, id: usize, chain: &[usize]) -> TractResult<TValue> {
    let mut value = take_weight(model, id)?.into_tvalue();
    for &step in chain {
        let mut outputs = model.nodes[step]
            .op
            .eval_out_of_plan(tvec![value])?
            .with_context(|| format!("{}: a stateful op in a weight's chain", model.nodes[step]))?;
        value = outputs.remove(0);
    }
    Ok(value)
}

/// What the pack op `last` would make of a stand-in: its packed form from
/// the mapped file, checked against the format, sizes and batch the op asks.
fn mapped(
    model: &TypedModel,
    last: usize,
    label: &str,
    weights: &MappedWeights,
) -> TractResult<TValue> {
    let node = &model.nodes[last];
    anyhow::ensure!(
        node.op_is::<OptMatMulPack>(),
        "stand-in {label} does not end in a pack but in {node}"
    );
    let fact = &node.outputs[0].fact;
    let packing = fact
        .exotic_fact
        .as_ref()
        .and_then(|f| f.downcast_ref::<DynPackedExoticFact>())
        .with_context(|| format!("{node}: no packing fact"))?;
    let [packer] = &packing.packers[..] else {
        anyhow::bail!(
            "{node}: {} packers, a mapped weight has one",
            packing.packers.len()
        );
    };
    let shape = fact
        .shape
        .as_concrete()
        .with_context(|| format!("{node}: symbolic shape"))?;
    anyhow::ensure!(
        shape.iter().product::<usize>() == 1,
        "{node}: a batch of packed matrices"
    );
    let request = PackRequest {
        format: &**packer,
        k: packing.k.to_usize()?,
        mn: packing.mn.to_usize()?,
        shape,
    };
    let tensor = weights.tensor(label, &request)?;
    Ok(tensor.into_tvalue())
}

/// The weight of a `Const` node, owned: the node and its fact let go of it so
/// that ops which change a tensor in place need not copy it. The node is left
/// holding a scalar and must be cut out of the graph before it is used again.
fn take_weight(model: &mut TypedModel, id: usize) -> TractResult<Tensor> {
    let node = &mut model.nodes[id];
    node.outputs[0].fact.konst = None;
    let placeholder: Box<dyn TypedOp> = Box::new(Const::new(rctensor0(0f32))?);
    let op = std::mem::replace(&mut node.op, placeholder);
    let weight = op
        .downcast_ref::<Const>()
        .context("weight node is not a constant")?
        .val()
        .clone();
    drop(op);
    Ok(Arc::try_unwrap(weight).unwrap_or_else(|shared| (*shared).clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::einsum::EinSum;

    /// A matrix product whose weight (1 100 × 1 024 floats, 4.5 MB) is over
    /// tract's folding allowance, so the pass is what packs it.
    fn product_with_large_weight() -> TractResult<(TypedModel, Tensor)> {
        let (k, n) = (1100, 1024);
        let values: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let weight = Tensor::from_shape(&[k, n], &values)?;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([3, k]))?;
        let w = model.add_const("w", weight.clone())?;
        let product = EinSum::new("mk,kn->mn".parse()?, f32::datum_type());
        let y = model.wire_node("product", product, &[x, w])?;
        model.select_output_outlets(&y)?;
        let input: Vec<f32> = (0..3 * k).map(|i| (i % 17) as f32 / 17.0).collect();
        Ok((
            model.into_decluttered()?,
            Tensor::from_shape(&[3, k], &input)?,
        ))
    }

    #[test]
    fn plans_compute_what_tracts_own_codegen_computes() -> TractResult<()> {
        let (model, input) = product_with_large_weight()?;
        let mut ours = model.clone();
        ours.optimize_with_session(&mut codegen_optimizer(Default::default()).session())?;
        let mut theirs = model;
        theirs.optimize()?;
        let run = |m: TypedModel| -> TractResult<Tensor> {
            let out = m.into_runnable()?.run(tvec![input.clone().into_tvalue()])?;
            Ok(out[0].clone().into_tensor())
        };
        assert_eq!(run(ours)?, run(theirs)?);
        Ok(())
    }

    #[test]
    fn the_weight_is_moved_out_of_its_node_not_copied() -> TractResult<()> {
        let (mut model, _) = product_with_large_weight()?;
        let id = model.node_id_by_name("w")?;
        let before = model.nodes[id]
            .op_as::<Const>()
            .context("w")?
            .val()
            .as_ptr::<f32>()?;
        let taken = take_weight(&mut model, id)?;
        assert_eq!(taken.as_ptr::<f32>()?, before);
        Ok(())
    }

    #[test]
    fn small_weights_are_left_to_tract() -> TractResult<()> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([3, 8]))?;
        let w = model.add_const("w", Tensor::zero::<f32>(&[8, 8])?)?;
        let product = EinSum::new("mk,kn->mn".parse()?, f32::datum_type());
        let y = model.wire_node("product", product, &[x, w])?;
        model.select_output_outlets(&y)?;
        let id = model.node_id_by_name("w")?;
        assert!(chain_after(&model, id).is_none());
        Ok(())
    }
}
