//! Attention computed in slices of query rows.
//!
//! Exported attention is `EinSum(q, k) → Softmax → EinSum(·, v)`, and tract
//! materialises the whole score matrix: at 512² a Stable Diffusion UNet's
//! first-level self-attention holds heads × 4096 × 4096 floats (335 MB for
//! five heads), more than any other tensor of the run. Split along the query
//! axis, each slice needs only its rows of the scores, the slices are
//! independent (softmax runs along the key axis), and tract's
//! memory-minimising evaluation order finishes one slice, freeing its scores,
//! before it starts the next.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::axes::{AxesMapping, Axis};
use tract_onnx::tract_core::ops::array::{Slice, TypedConcat};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::Softmax;

/// One attention block found in the graph.
struct Attention {
    scores: usize,
    between: Vec<usize>,
    softmax: usize,
    output: usize,
    probabilities_slot: usize,
    query_input: usize,
    query_axis: usize,
    output_axis: usize,
    rows: usize,
    slices: usize,
}

/// Rewrites every attention block whose scores exceed `max_score_bytes`;
/// returns how many were rewritten.
pub fn slice_attention(model: &mut TypedModel, max_score_bytes: usize) -> TractResult<usize> {
    let found: Vec<Attention> = model
        .eval_order()?
        .into_iter()
        .filter_map(|id| find(model, id, max_score_bytes).transpose())
        .collect::<TractResult<_>>()?;
    for attention in &found {
        patch(model, attention)?.apply(model)?;
    }
    if !found.is_empty() {
        model.compact()?;
    }
    Ok(found.len())
}

fn find(model: &TypedModel, softmax: usize, max_bytes: usize) -> TractResult<Option<Attention>> {
    let node = model.node(softmax);
    let Some(op) = node.op_as::<Softmax>() else {
        return Ok(None);
    };
    let [key_axis] = op.axes[..] else {
        return Ok(None);
    };
    if op.quant_output_dt.is_some() {
        return Ok(None);
    }
    let Some(output) = sole_successor(model, softmax) else {
        return Ok(None);
    };
    if model
        .node(output)
        .op_as::<EinSum>()
        .is_none_or(|e| e.q_params.is_some())
    {
        return Ok(None);
    }
    let mut between = vec![];
    let mut scores = node.inputs[0].node;
    while is_pointwise(model, scores)? {
        if sole_successor(model, scores).is_none() {
            return Ok(None);
        }
        between.push(scores);
        scores = model.node(scores).inputs[0].node;
    }
    between.reverse();
    let Some(product) = model.node(scores).op_as::<EinSum>() else {
        return Ok(None);
    };
    if product.q_params.is_some() || sole_successor(model, scores).is_none() {
        return Ok(None);
    }
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(shape) = fact.shape.as_concrete() else {
        return Ok(None);
    };
    let bytes = shape.iter().product::<usize>() * fact.datum_type.size_of();
    if bytes <= max_bytes {
        return Ok(None);
    }
    let Some((query_input, query_axis, score_axis)) = query_axis(&product.axes, key_axis) else {
        return Ok(None);
    };
    let Some((probabilities_slot, output_axis)) = carried_axis(model, output, softmax, score_axis)
    else {
        return Ok(None);
    };
    let rows = shape[score_axis];
    let slices = bytes.div_ceil(max_bytes).min(rows);
    Ok(Some(Attention {
        scores,
        between,
        softmax,
        output,
        probabilities_slot,
        query_input,
        query_axis,
        output_axis,
        rows,
        slices,
    }))
}

fn sole_successor(model: &TypedModel, node: usize) -> Option<usize> {
    let node = model.node(node);
    match &node.outputs[..] {
        [out] if out.successors.len() == 1 => Some(out.successors[0].node),
        _ => None,
    }
}

/// Element-wise on the scores: a unary op, or a binary op whose other operand
/// is a broadcast constant (the 1/√d scale, say).
fn is_pointwise(model: &TypedModel, id: usize) -> TractResult<bool> {
    let node = model.node(id);
    if node.op_is::<ElementWiseOp>() {
        return Ok(node.inputs.len() == 1);
    }
    if !node.op_is::<TypedBinOp>() || node.inputs.len() != 2 {
        return Ok(false);
    }
    let other = model.outlet_fact(node.inputs[1])?;
    Ok(other.konst.is_some() && other.shape.iter().all(|d| d.is_one()))
}

/// The scores product's query-row axis: in its output and in exactly one
/// input, not the softmax axis. Returns (that input, the axis's position in
/// it, its position in the scores).
fn query_axis(axes: &AxesMapping, key_axis: usize) -> Option<(usize, usize, usize)> {
    let is_key = |axis: &Axis| axis.outputs[0].first() == Some(&key_axis);
    let key = axes.iter_all_axes().find(|a| is_key(a))?;
    let key_input = (0..2).find(|&i| key.inputs[i].len() == 1 && key.inputs[1 - i].is_empty())?;
    let query_input = 1 - key_input;
    axes.iter_all_axes()
        .filter(|a| !is_key(a) && a.outputs[0].len() == 1)
        .filter(|a| a.inputs[query_input].len() == 1 && a.inputs[key_input].is_empty())
        .map(|a| (query_input, a.inputs[query_input][0], a.outputs[0][0]))
        .next()
}

/// Where the attention output carries the scores' query axis: the output
/// product must keep it, and take it from the probabilities only. Returns
/// (the probabilities' input slot, the axis's position in the output).
fn carried_axis(
    model: &TypedModel,
    output: usize,
    softmax: usize,
    score_axis: usize,
) -> Option<(usize, usize)> {
    let node = model.node(output);
    let op = node.op_as::<EinSum>()?;
    let slot = node.inputs.iter().position(|i| i.node == softmax)?;
    if node.inputs.iter().filter(|i| i.node == softmax).count() != 1 {
        return None;
    }
    let axis = op
        .axes
        .iter_all_axes()
        .find(|a| a.inputs[slot].first() == Some(&score_axis))?;
    let elsewhere = (0..node.inputs.len()).any(|i| i != slot && !axis.inputs[i].is_empty());
    match &axis.outputs[0][..] {
        [position] if !elsewhere => Some((slot, *position)),
        _ => None,
    }
}

fn patch(model: &TypedModel, at: &Attention) -> TractResult<TypedModelPatch> {
    let name = &model.node(at.softmax).name;
    let mut patch = TypedModelPatch::new(format!("slice attention {name} in {}", at.slices));
    let scores_node = model.node(at.scores);
    let output_node = model.node(at.output);
    let scores_in = tap_all(&mut patch, model, &scores_node.inputs)?;
    let output_in = tap_all(&mut patch, model, &output_node.inputs)?;
    let between_in: Vec<Option<OutletId>> = at
        .between
        .iter()
        .map(|&id| match model.node(id).inputs.get(1) {
            Some(&konst) => patch.tap_model(model, konst).map(Some),
            None => Ok(None),
        })
        .collect::<TractResult<_>>()?;
    let step = at.rows.div_ceil(at.slices);
    let mut pieces = tvec![];
    for (ix, start) in (0..at.rows).step_by(step).enumerate() {
        let end = (start + step).min(at.rows);
        let slice = Slice::new(at.query_axis, start as i64, end as i64);
        let query =
            patch.wire_node(format!("{name}.q{ix}"), slice, &[scores_in[at.query_input]])?[0];
        let mut inputs = scores_in.clone();
        inputs[at.query_input] = query;
        let mut wire = patch.wire_node(
            format!("{}.s{ix}", scores_node.name),
            scores_node.op.clone(),
            &inputs,
        )?[0];
        for (&id, konst) in at.between.iter().zip(&between_in) {
            let node = model.node(id);
            let inputs: TVec<OutletId> = std::iter::once(wire).chain(*konst).collect();
            wire = patch.wire_node(format!("{}.s{ix}", node.name), node.op.clone(), &inputs)?[0];
        }
        let softmax = model.node(at.softmax).op.clone();
        wire = patch.wire_node(format!("{name}.s{ix}"), softmax, &[wire])?[0];
        let mut inputs = output_in.clone();
        inputs[at.probabilities_slot] = wire;
        let op = output_node.op.clone();
        pieces.push(patch.wire_node(format!("{}.s{ix}", output_node.name), op, &inputs)?[0]);
    }
    let joined = patch.wire_node(
        format!("{}.joined", output_node.name),
        TypedConcat {
            axis: at.output_axis,
        },
        &pieces,
    )?[0];
    patch.shunt_outside(model, at.output.into(), joined)?;
    Ok(patch)
}

fn tap_all(
    patch: &mut TypedModelPatch,
    model: &TypedModel,
    outlets: &[OutletId],
) -> TractResult<TVec<OutletId>> {
    outlets.iter().map(|&o| patch.tap_model(model, o)).collect()
}
