//! Helpers shared by the golden tests.

use hooks::candle_core::Tensor;

/// max |a - b| / max |b|: the error relative to the tensor's scale.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    hooks::compare::relative_error(actual, expected).unwrap()
}

/// `x: [batch, seq, heads * head_dim]` with head `head`'s slice set to zero: that head
/// switched off when `x` is the heads' outputs.
pub fn zero_head(x: &Tensor, head: usize, head_dim: usize) -> hooks::Result<Tensor> {
    let width = x.dim(2)?;
    let keep: Vec<f32> = (0..width)
        .map(|j| if j / head_dim == head { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::new(keep, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_mul(&keep)?)
}

/// Attention weights `[batch, heads, seq, seq]` in which each position attends equally to
/// itself and every earlier one (as the fixture generator's `uniform_causal_pattern`).
pub fn uniform_causal_pattern(like: &Tensor) -> hooks::Result<Tensor> {
    let (batch, heads, seq, _) = like.dims4()?;
    let rows: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j <= i { 1.0 / (i + 1) as f32 } else { 0.0 }))
        .collect();
    let rows = Tensor::from_vec(rows, (seq, seq), like.device())?;
    Ok(rows
        .broadcast_as((batch, heads, seq, seq))?
        .to_dtype(like.dtype())?)
}

/// Replacing each hook point's tensor with its own value leaves the logits bit-identical.
/// A captured or replaced pattern runs its layer's attention unfused, so the patterns are
/// replaced in passes that capture every pattern, as their reference pass does.
pub fn assert_self_replacement_changes_no_bit(model: &hooks::Model, ids: &Tensor) {
    use hooks::Hooks;
    let all = model.hook_points();
    let (per_token, patterns): (Vec<_>, Vec<_>) = all.iter().partition(|p| p.is_per_token());
    let flat =
        |t: Option<Tensor>| -> Vec<f32> { t.unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    for (points, captured) in [(per_token, vec![]), (patterns.clone(), patterns)] {
        let reference = model
            .forward(ids, &mut Hooks::new().capture(points.clone()))
            .unwrap();
        let reference_logits = flat(reference.logits.clone());
        for point in points {
            let mut hooks = Hooks::new()
                .capture(captured.clone())
                .replace_with(point, reference.captures[&point].clone());
            let logits = model.forward(ids, &mut hooks).unwrap().logits;
            assert!(
                flat(logits) == reference_logits,
                "{}",
                model.hook_name(point)
            );
        }
    }
}

/// Every hook point, then every per-token one: a capture of the attention patterns runs
/// attention unfused, so only the second set runs the default attention kernels.
pub fn all_then_per_token_points(model: &hooks::Model) -> [Vec<hooks::HookPoint>; 2] {
    let all = model.hook_points();
    let per_token = all.iter().copied().filter(|p| p.is_per_token()).collect();
    [all, per_token]
}
