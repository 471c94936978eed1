//! Decluttering a graph read back from the compile cache with its matrix
//! products' weights set aside.
//!
//! Saving a graph as NNEF rewrites each matrix product into NNEF's form: a
//! weight gains a unit batch axis, and a weight whose input was reshaped
//! loses that split again. Declutter after loading undoes both by building a
//! new, reshaped copy of the weight. That copy costs the time of reading the
//! weight, and it is a tensor the compile cache did not load, so its packed
//! form could not be saved or mapped. Here each such weight is swapped for a
//! slot of the same type that declutter can neither fold nor reshape, and put
//! back afterwards: the same tensor, which codegen's preparation chain then
//! reshapes in place (see `fold`).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;

/// Declutters `model`, leaving the weights `aside` picks as they were loaded.
/// Only weights that feed matrix products alone are set aside: other ops'
/// declutter may look at their values.
pub fn declutter(model: &mut TypedModel, aside: impl Fn(&Arc<Tensor>) -> bool) -> TractResult<()> {
    let weights = set_aside(model, aside)?;
    model.declutter()?;
    put_back(model, weights)
}

fn set_aside(
    model: &mut TypedModel,
    aside: impl Fn(&Arc<Tensor>) -> bool,
) -> TractResult<Vec<Arc<Tensor>>> {
    let mut weights = vec![];
    for id in 0..model.nodes.len() {
        let Some(konst) = model.nodes[id].op_as::<Const>() else {
            continue;
        };
        if konst.exotic_fact().is_some() {
            continue;
        }
        let weight = konst.val().clone();
        if !aside(&weight) || !feeds_products_only(model, id) {
            continue;
        }
        let fact = TypedFact::dt_shape(weight.datum_type(), weight.shape());
        let node = &mut model.nodes[id];
        node.op = Box::new(WeightSlot {
            index: weights.len(),
            fact: fact.clone(),
        });
        node.outputs[0].fact = fact;
        weights.push(weight);
    }
    Ok(weights)
}

fn feeds_products_only(model: &TypedModel, id: usize) -> bool {
    let successors = &model.nodes[id].outputs[0].successors;
    !successors.is_empty()
        && successors
            .iter()
            .all(|s| model.nodes[s.node].op_is::<EinSum>())
}

fn put_back(model: &mut TypedModel, weights: Vec<Arc<Tensor>>) -> TractResult<()> {
    let mut weights: Vec<Option<Arc<Tensor>>> = weights.into_iter().map(Some).collect();
    for node in &mut model.nodes {
        let Some(slot) = node.op_as::<WeightSlot>() else {
            continue;
        };
        let index = slot.index;
        let weight = weights
            .get_mut(index)
            .and_then(Option::take)
            .with_context(|| format!("{node}: weight slot {index} seen twice"))?;
        anyhow::ensure!(
            node.outputs[0].fact == slot.fact,
            "{node}: declutter changed a weight slot's type"
        );
        node.outputs[0].fact = TypedFact::try_from(weight.clone())?;
        node.op = Box::new(Const::new(weight)?);
    }
    Ok(())
}

/// Stands for a set-aside weight: typed like it, but neither a constant
/// (nothing folds it) nor open to axis changes (nothing reshapes it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WeightSlot {
    index: usize,
    fact: TypedFact,
}

impl Op for WeightSlot {
    fn name(&self) -> StaticName {
        "WeightSlot".into()
    }

    op_as_typed_op!();
}

impl EvalOp for WeightSlot {
    not_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        bail!(
            "weight slot {} evaluated before its weight was put back",
            self.index
        )
    }
}

impl TypedOp for WeightSlot {
    as_op!();

    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.fact.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix product as NNEF saves it: the weight carries the unit batch
    /// axis of the activations.
    fn saved_product() -> TractResult<(TypedModel, Arc<Tensor>, Tensor)> {
        let (m, k, n) = (3, 96, 64);
        let values: Vec<f32> = (0..k * n)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let weight = Tensor::from_shape(&[1, k, n], &values)?.into_arc_tensor();
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, m, k]))?;
        let w = model.wire_node("w", Const::new(weight.clone())?, &[])?[0];
        let product = EinSum::new("bmk,bkn->bmn".parse()?, f32::datum_type());
        let y = model.wire_node("product", product, &[x, w])?;
        model.select_output_outlets(&y)?;
        let input: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 13.0).collect();
        Ok((model, weight, Tensor::from_shape(&[1, m, k], &input)?))
    }

    fn weight_of(model: &TypedModel) -> Option<Arc<Tensor>> {
        let product = model.node_id_by_name("product").ok()?;
        let mut outlet = model.nodes[product].inputs[1];
        loop {
            let node = &model.nodes[outlet.node];
            if let Some(konst) = node.op_as::<Const>() {
                return Some(konst.val().clone());
            }
            outlet = *node.inputs.first()?;
        }
    }

    fn run(model: TypedModel, input: &Tensor) -> TractResult<Tensor> {
        let outputs = model
            .into_optimized()?
            .into_runnable()?
            .run(tvec![input.clone().into()])?;
        Ok(outputs[0].clone().into_tensor())
    }

    #[test]
    fn plain_declutter_makes_a_new_weight() -> TractResult<()> {
        let (model, weight, _) = saved_product()?;
        let decluttered = model.into_decluttered()?;
        let folded = weight_of(&decluttered).context("weight")?;
        assert!(!Arc::ptr_eq(&folded, &weight));
        assert_eq!(folded.shape(), &weight.shape()[1..]);
        Ok(())
    }

    #[test]
    fn set_aside_weights_come_back_as_loaded() -> TractResult<()> {
        let (mut model, weight, input) = saved_product()?;
        let expected = run(model.clone().into_decluttered()?, &input)?;
        declutter(&mut model, |_| true)?;
        assert!(Arc::ptr_eq(&weight_of(&model).context("weight")?, &weight));
        assert!(model.nodes.iter().all(|n| !n.op_is::<WeightSlot>()));
        assert_eq!(run(model, &input)?, expected);
        Ok(())
    }

    #[test]
    fn weights_not_picked_are_decluttered_as_usual() -> TractResult<()> {
        let (mut model, weight, _) = saved_product()?;
        declutter(&mut model, |_| false)?;
        assert!(!Arc::ptr_eq(&weight_of(&model).context("weight")?, &weight));
        Ok(())
    }
}
