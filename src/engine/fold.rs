//! Folding a large weight's preparation chain with one copy of it alive.
//!
//! tract's codegen wires each convolution's and matrix product's weight
//! through axis changes into a pack, and its constant folding then evaluates
//! that chain while the weight stays referenced by its `Const` node: the
//! first axis op copies the shared tensor and the pack makes a third buffer.
//! For the largest kernel of a UNet (118 MB) that spike sets the process's
//! peak memory. This pass runs ahead of tract's own folding, takes the weight
//! out of its node, so the axis changes work in place, and leaves at most
//! the weight and its packed form alive at once.

use anyhow::Context;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::{AxisOp, IntoShape};
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::pack::OptMatMulPack;
use tract_onnx::tract_core::optim::{
    Optimizer, OptimizerSession, TypedPass, CONST_FOLD_MEM_BUDGET,
};

/// tract's codegen pipeline with the frugal fold ahead of its own.
pub fn codegen_optimizer() -> Optimizer {
    let mut optimizer = Optimizer::codegen();
    optimizer.add_pass(0, Box::new(FoldWeightPreparation));
    optimizer
}

#[derive(Clone, Debug, Default)]
struct FoldWeightPreparation;

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
        let weights: Vec<String> = model
            .nodes
            .iter()
            .filter(|node| chain_after(model, node.id).is_some())
            .map(|node| node.name.clone())
            .collect();
        for name in &weights {
            let id = model.node_id_by_name(name)?;
            if let Some(chain) = chain_after(model, id) {
                fold(model, id, &chain)?;
                model.compact()?;
            }
        }
        Ok(!weights.is_empty())
    }
}

/// The preparation ops fed by a large, plain constant, in order, when it has
/// any; each of them the only consumer of the one before.
fn chain_after(model: &TypedModel, id: usize) -> Option<Vec<usize>> {
    let node = &model.nodes[id];
    let konst = node.op_as::<Const>()?;
    let tensor = konst.val();
    if konst.exotic_fact().is_some()
        || !tensor.is_plain()
        || (tensor.len() * tensor.datum_type().size_of()) as u64 <= CONST_FOLD_MEM_BUDGET
    {
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
fn fold(model: &mut TypedModel, id: usize, chain: &[usize]) -> TractResult<()> {
    let mut value = take_weight(model, id)?.into_tvalue();
    for &step in chain {
        let mut outputs = model.nodes[step]
            .op
            .eval_out_of_plan(tvec![value])?
            .with_context(|| format!("{}: a stateful op in a weight's chain", model.nodes[step]))?;
        value = outputs.remove(0);
    }
    let last = *chain.last().context("empty chain")?;
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
        ours.optimize_with_session(&mut codegen_optimizer().session())?;
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
