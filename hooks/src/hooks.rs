//! Requests passed into a forward pass: which hook points to capture, which to replace,
//! and whether the logits are needed at all (if not, the pass stops after the last
//! hook point it must visit).

use std::collections::{BTreeMap, BTreeSet};

use candle_core::Tensor;

use crate::hookpoint::AttentionName;
use crate::{Error, HookPoint, Result};

/// A replacement: given the tensor at a hook point, returns the tensor that flows on,
/// or `None` to leave it unchanged.
pub type ReplaceFn<'a> = Box<dyn FnMut(&Tensor) -> Result<Option<Tensor>> + 'a>;

/// The captures and replacements for one forward pass.
///
/// A captured tensor is the value that flows on, i.e. after any replacement at the same
/// point. Capturing costs nothing (tensors are reference counted).
pub struct Hooks<'a> {
    captures: BTreeSet<HookPoint>,
    replacements: BTreeMap<HookPoint, ReplaceFn<'a>>,
    logits: bool,
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> Hooks<'a> {
    /// No captures, no replacements; the pass runs to the logits.
    pub fn new() -> Self {
        Hooks {
            captures: BTreeSet::new(),
            replacements: BTreeMap::new(),
            logits: true,
        }
    }

    /// Only the given captures: the pass stops after the last of them and computes no logits
    /// (unless `Logits` is among them).
    pub fn capture_only(points: impl IntoIterator<Item = HookPoint>) -> Self {
        let mut hooks = Self::new().capture(points);
        hooks.logits = hooks.captures.contains(&HookPoint::Logits);
        hooks
    }

    /// Adds hook points to capture.
    pub fn capture(mut self, points: impl IntoIterator<Item = HookPoint>) -> Self {
        self.captures.extend(points);
        self
    }

    /// Replaces the tensor at `point` with what `f` returns (ablation, patching, steering).
    pub fn replace(
        mut self,
        point: HookPoint,
        f: impl FnMut(&Tensor) -> Result<Option<Tensor>> + 'a,
    ) -> Self {
        self.replacements.insert(point, Box::new(f));
        self
    }

    /// Replaces the tensor at `point` with a fixed tensor of the same shape.
    pub fn replace_with(self, point: HookPoint, value: Tensor) -> Self {
        self.replace(point, move |_| Ok(Some(value.clone())))
    }

    /// Whether the logits will be computed.
    pub fn wants_logits(&self) -> bool {
        self.logits
    }

    /// The last hook point the pass must reach, or `None` when it must run to the logits.
    fn stop_point(&self) -> Option<HookPoint> {
        if self.logits {
            return None;
        }
        self.captures
            .iter()
            .chain(self.replacements.keys())
            .max()
            .copied()
    }

    /// Every hook point named by a capture or a replacement.
    pub fn points(&self) -> impl Iterator<Item = HookPoint> + '_ {
        self.captures
            .iter()
            .chain(self.replacements.keys())
            .copied()
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[batch, seq, vocab]` logits, absent when the pass stopped early.
    pub logits: Option<Tensor>,
    /// The captured tensors, each `[batch, seq, width]` (attention patterns
    /// `[batch, heads, seq, keys]`: `keys` is `seq` plus any cached positions).
    pub captures: BTreeMap<HookPoint, Tensor>,
}

/// The per-pass state an architecture's forward threads through its hook points.
pub(crate) struct Tap<'h, 'a> {
    hooks: &'h mut Hooks<'a>,
    stop: Option<HookPoint>,
    captured: BTreeMap<HookPoint, Tensor>,
    /// The model's spelling of hook point names, for errors.
    spelling: AttentionName,
}

impl<'h, 'a> Tap<'h, 'a> {
    pub(crate) fn new(hooks: &'h mut Hooks<'a>, spelling: AttentionName) -> Self {
        let stop = hooks.stop_point();
        Tap {
            hooks,
            stop,
            captured: BTreeMap::new(),
            spelling,
        }
    }

    /// Passes the tensor at `point` through any replacement and records it if captured.
    pub(crate) fn visit(&mut self, point: HookPoint, x: Tensor) -> Result<Tensor> {
        let x = match self.hooks.replacements.get_mut(&point) {
            Some(replace) => match replace(&x)? {
                Some(new) => conform((point, self.spelling), &x, new)?,
                None => x,
            },
            None => x,
        };
        if self.hooks.captures.contains(&point) {
            self.captured.insert(point, x.clone());
        }
        Ok(x)
    }

    /// True when a hook captures or replaces `point`: a fused kernel may skip making the
    /// tensor of a point that is not touched.
    pub(crate) fn touches(&self, point: HookPoint) -> bool {
        self.hooks.replacements.contains_key(&point) || self.hooks.captures.contains(&point)
    }

    /// True when a hook replaces `point` (its tensor may change, even in place).
    pub(crate) fn replaces(&self, point: HookPoint) -> bool {
        self.hooks.replacements.contains_key(&point)
    }

    /// Makes the pass go on at least through `point`, whatever the hooks need.
    pub(crate) fn run_through(&mut self, point: HookPoint) {
        self.stop = self.stop.map(|stop| stop.max(point));
    }

    /// True when nothing after `point` is needed, so the pass can stop.
    pub(crate) fn done_after(&self, point: HookPoint) -> bool {
        self.stop.is_some_and(|stop| stop <= point)
    }

    pub(crate) fn finish(self, logits: Option<Tensor>) -> ForwardOutput {
        ForwardOutput {
            logits,
            captures: self.captured,
        }
    }
}

/// Checks a replacement's shape and brings it to the original's dtype and device.
fn conform(
    (point, spelling): (HookPoint, AttentionName),
    original: &Tensor,
    new: Tensor,
) -> Result<Tensor> {
    if new.dims() != original.dims() {
        return Err(Error::InvalidArgument(format!(
            "replacement at hook point '{}' has shape {:?}, expected {:?}",
            point.name(spelling),
            new.dims(),
            original.dims()
        )));
    }
    Ok(new
        .to_device(original.device())?
        .to_dtype(original.dtype())?)
}
