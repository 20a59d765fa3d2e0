//! Helpers shared by the golden tests.

use std::collections::HashMap;

use hooks::candle_core::Tensor;
use hooks::{HookPoint, Hooks, KvCache, Model};

/// max |a - b| / max |b|: the error relative to the tensor's scale.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    hooks::compare::relative_error(actual, expected).unwrap()
}

/// `x: [batch, seq, heads * head_dim]` with head `head`'s slice set to zero: that head
/// switched off when `x` is the heads' outputs.
fn zero_head(x: &Tensor, head: usize, head_dim: usize) -> hooks::Result<Tensor> {
    let width = x.dim(2)?;
    let keep: Vec<f32> = (0..width)
        .map(|j| if j / head_dim == head { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::new(keep, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_mul(&keep)?)
}

/// Attention weights `[batch, heads, seq, seq]` in which each position attends equally to
/// itself and every earlier one (as the fixture generator's `uniform_causal_pattern`).
fn uniform_causal_pattern(like: &Tensor) -> hooks::Result<Tensor> {
    let (batch, heads, seq, _) = like.dims4()?;
    let rows: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j <= i { 1.0 / (i + 1) as f32 } else { 0.0 }))
        .collect();
    let rows = Tensor::from_vec(rows, (seq, seq), like.device())?;
    Ok(rows
        .broadcast_as((batch, heads, seq, seq))?
        .to_dtype(like.dtype())?)
}

/// Replacing each hook point's tensor with its own value leaves the logits bit-identical, and
/// so does capturing every hook point: on the CPU the attention kernel that writes out a
/// pattern gives the output of the one that does not, and re-weighs the values by a replaced
/// pattern in the same order.
pub fn assert_self_replacement_changes_no_bit(model: &Model, ids: &Tensor) {
    // Exact for every dtype a model computes in.
    let flat = |t: Option<Tensor>| -> Vec<f32> {
        let t = t.unwrap().to_dtype(hooks::candle_core::DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    let [all, per_token] = all_then_per_token_points(model);
    let reference = model
        .forward(ids, &mut Hooks::new().capture(all.clone()))
        .unwrap();
    let reference_logits = flat(reference.logits.clone());
    let plain = model
        .forward(ids, &mut Hooks::new().capture(per_token))
        .unwrap();
    assert!(
        flat(plain.logits) == reference_logits,
        "capturing the patterns changed the logits"
    );
    for point in all {
        let mut hooks = Hooks::new().replace_with(point, reference.captures[&point].clone());
        let logits = model.forward(ids, &mut hooks).unwrap().logits;
        assert!(
            flat(logits) == reference_logits,
            "{}",
            model.hook_name(point)
        );
    }
}

/// Every hook point, then every per-token one: a capture of the attention patterns runs the
/// attention kernel that writes them out, so only the second set runs the default one.
pub fn all_then_per_token_points(model: &Model) -> [Vec<HookPoint>; 2] {
    let all = model.hook_points();
    let per_token = all.iter().copied().filter(|p| p.is_per_token()).collect();
    [all, per_token]
}

/// Compares every hook point's capture with the fixture's value of the same name (the
/// logits with `logits_key`, whose trailing positions it may hold), with and without the
/// attention patterns; returns the worst relative error and its hook point.
pub fn assert_hook_points_match(
    model: &Model,
    expected: &HashMap<String, Tensor>,
    tolerance: f64,
    logits_key: &str,
) -> (f64, String) {
    let mut worst = (0f64, String::new());
    for points in all_then_per_token_points(model) {
        let mut hooks = Hooks::new().capture(points.clone());
        let out = model.forward(&expected["input_ids"], &mut hooks).unwrap();
        for point in points {
            let name = model.hook_name(point);
            let actual = &out.captures[&point];
            let (want, actual) = if point == HookPoint::Logits {
                let want = &expected[logits_key];
                let (keep, seq) = (want.dim(1).unwrap(), actual.dim(1).unwrap());
                (want, actual.narrow(1, seq - keep, keep).unwrap())
            } else {
                (&expected[&name], actual.clone())
            };
            let err = relative_error(&actual, want);
            assert!(
                err < tolerance,
                "{name}: relative error {err} >= {tolerance}"
            );
            if err >= worst.0 {
                worst = (err, name);
            }
        }
    }
    worst
}

/// A replacement of the tensor at a hook point, given the head width.
type Edit = fn(&Tensor, usize) -> hooks::Result<Tensor>;

/// The edits the fixtures hold the logits of, made as transformers made them: zeroing the
/// MLP of layer 1 and the attention of layer 0, switching head 1 of layer 0 off through
/// the heads' outputs (a pre-hook on the output projection), and replacing layer 0's
/// attention weights with a uniform causal pattern (a registered attention function).
/// Each must match within 1e-4 and change the logits; capturing a pattern must not.
pub fn assert_edits_match(model: &Model, expected: &HashMap<String, Tensor>) {
    let ids = &expected["input_ids"];
    let logits = |hooks: &mut Hooks| model.forward(ids, hooks).unwrap().logits.unwrap();
    let head_dim = model.config().head_dim();
    let name = |point| model.hook_name(point);
    let edits: [(String, HookPoint, Edit); 4] = [
        (
            format!("ablate.{}.logits", name(HookPoint::Mlp(1))),
            HookPoint::Mlp(1),
            |x, _| Ok(x.zeros_like()?),
        ),
        (
            format!("ablate.{}.logits", name(HookPoint::Attention(0))),
            HookPoint::Attention(0),
            |x, _| Ok(x.zeros_like()?),
        ),
        (
            format!("ablate.{}.head1.logits", name(HookPoint::AttentionHeads(0))),
            HookPoint::AttentionHeads(0),
            |x, head_dim| zero_head(x, 1, head_dim),
        ),
        (
            format!(
                "edit.{}.uniform.logits",
                name(HookPoint::AttentionPattern(0))
            ),
            HookPoint::AttentionPattern(0),
            |p, _| uniform_causal_pattern(p),
        ),
    ];
    for (key, point, edit) in edits {
        let edited = logits(&mut Hooks::new().replace(point, |x| Ok(Some(edit(x, head_dim)?))));
        let err = relative_error(&edited, &expected[&key]);
        println!("{key}: relative error {err:.2e}");
        assert!(err < 1e-4, "{key}: relative error {err}");
        assert!(
            relative_error(&edited, &expected["logits"]) > 1e-3,
            "{key}: no change"
        );
    }
    let captured = logits(&mut Hooks::new().capture([HookPoint::AttentionPattern(0)]));
    assert!(relative_error(&captured, &expected["logits"]) < 1e-5);
}

/// Running sequences in parts through a KV cache gives the logits of one pass over the whole:
/// split in two (the first part with hooks that need no layer, which must still fill the
/// cache), one token at a time, and one cached prompt continued by a batch. The later part's
/// attention patterns are the whole pass's rows, and putting them back changes no bit.
pub fn assert_cached_passes_match(model: &Model, ids: &Tensor) {
    let ids = if ids.rank() == 1 {
        ids.unsqueeze(0).unwrap()
    } else {
        ids.clone()
    };
    let (batch, seq) = ids.dims2().unwrap();
    let split = (seq / 3).max(1);
    let rest = seq - split;
    let pattern = HookPoint::AttentionPattern(model.config().num_layers() - 1);
    let whole = model
        .forward(&ids, &mut Hooks::new().capture([pattern]))
        .unwrap();
    let logits = whole.logits.unwrap();
    let close = |got: &Tensor, want: &Tensor, what: &str| {
        let err = relative_error(got, want);
        assert!(err < 1e-5, "{what}: relative error {err}");
    };

    let mut cache = KvCache::new();
    let first = model
        .forward_cached(
            &ids.narrow(1, 0, split).unwrap(),
            &mut Hooks::capture_only([HookPoint::Embed]),
            &mut cache,
        )
        .unwrap();
    assert!(first.logits.is_none());
    assert_eq!((cache.len(), cache.batch()), (split, Some(batch)));
    let mut before_second = cache.clone();
    let tail = ids.narrow(1, split, rest).unwrap();
    let second = model
        .forward_cached(&tail, &mut Hooks::new().capture([pattern]), &mut cache)
        .unwrap();
    assert_eq!(cache.len(), seq);
    let second_logits = second.logits.unwrap();
    close(
        &second_logits,
        &logits.narrow(1, split, rest).unwrap(),
        "second part",
    );
    let rows = &second.captures[&pattern];
    assert_eq!(rows.dims()[2..], [rest, seq]);
    close(
        rows,
        &whole.captures[&pattern].narrow(2, split, rest).unwrap(),
        "pattern",
    );
    let replaced = model
        .forward_cached(
            &tail,
            &mut Hooks::new().replace_with(pattern, rows.clone()),
            &mut before_second,
        )
        .unwrap();
    assert_eq!(
        hooks::compare::max_abs_diff(&replaced.logits.unwrap(), &second_logits).unwrap(),
        0.0,
        "a pattern replaced by its own value"
    );

    let mut cache = KvCache::new();
    for pos in 0..seq {
        let token = ids.narrow(0, 0, 1).unwrap().narrow(1, pos, 1).unwrap();
        let step = model
            .forward_cached(&token, &mut Hooks::new(), &mut cache)
            .unwrap();
        let want = logits.narrow(0, 0, 1).unwrap().narrow(1, pos, 1).unwrap();
        close(&step.logits.unwrap(), &want, &format!("token {pos}"));
    }

    let prompt = ids.narrow(0, 0, 1).unwrap().narrow(1, 0, split).unwrap();
    let mut shared = KvCache::new();
    model
        .forward_cached(&prompt, &mut Hooks::new(), &mut shared)
        .unwrap();
    let prompts = prompt.broadcast_as((batch, split)).unwrap();
    let joined = Tensor::cat(&[&prompts, &tail], 1).unwrap();
    let want = model
        .logits(&joined)
        .unwrap()
        .narrow(1, split, rest)
        .unwrap();
    let mut continued = shared.clone();
    let got = model
        .forward_cached(&tail, &mut Hooks::new(), &mut continued)
        .unwrap();
    close(&got.logits.unwrap(), &want, "a shared prompt");
    assert_eq!((shared.batch(), continued.batch()), (Some(1), Some(batch)));
}
