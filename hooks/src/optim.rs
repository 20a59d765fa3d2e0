//! Optimisers with saveable state, gradient clipping and learning-rate schedules, for the
//! trainers that compute their gradients by hand (lens, SAE). candle-nn's optimisers cannot
//! save their state and its SGD has no momentum; these follow PyTorch's update rules exactly
//! (and sparsify's Muon).

use candle_core::{DType, Tensor};

use crate::cuda_kernels::KernelSource;
use crate::{Error, Result};

#[cfg(test)]
mod kernel_tests;
#[cfg(feature = "cuda")]
mod launch;
mod muon;

/// The fused Adam update for CUDA devices (`optim/adam.cu`), compiled by NVRTC at run time:
/// one pass over a parameter, its gradient and its moments, where candle's tensor
/// operations take about a dozen (on the SAE's 0.5 GiB weight matrices, most of a step).
pub const ADAM_KERNEL: KernelSource = KernelSource {
    module: "eleuther_optim_kernels",
    source: include_str!("optim/adam.cu"),
};

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// SGD with momentum (PyTorch `torch.optim.SGD`, dampening 0), optionally Nesterov.
    Sgd {
        /// Momentum factor.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// Adam (PyTorch `torch.optim.Adam`), optionally AMSGrad.
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
        /// Keep the running maximum of the second moment.
        amsgrad: bool,
    },
    /// Muon, as sparsify has it (`sparsify/muon.py`, after Keller Jordan's): momentum, then
    /// the update orthogonalised by quintic Newton-Schulz iterations in bf16, scaled by
    /// `0.2 √max(rows, cols)`; for matrices only. Its weight decay is decoupled: the
    /// parameter shrinks by `lr × weight_decay` before each update.
    Muon {
        /// Momentum factor.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
        /// Newton-Schulz iterations.
        ns_steps: usize,
    },
}

/// An optimiser over a fixed list of parameter tensors. Weight decay is coupled (added to
/// the gradient), as in PyTorch's SGD and Adam, unless
/// [`Optimizer::with_decoupled_weight_decay`] (PyTorch's AdamW); Muon's is always decoupled.
#[derive(Debug)]
pub struct Optimizer {
    rule: Rule,
    weight_decay: f64,
    /// The parameter shrinks by `lr × weight_decay` before the update instead.
    decoupled: bool,
    step: u64,
    /// Per parameter: SGD and Muon `[momentum]`; Adam `[m, v]` or `[m, v, v_max]`.
    state: Vec<Vec<Tensor>>,
    /// Muon's buffers on the CPU.
    workspace: muon::Workspace,
}

impl Optimizer {
    /// A fresh optimiser (state is created on the first step).
    pub fn new(rule: Rule, weight_decay: f64) -> Self {
        Optimizer {
            rule,
            weight_decay,
            decoupled: false,
            step: 0,
            state: Vec::new(),
            workspace: muon::Workspace::default(),
        }
    }

    /// The same optimiser with decoupled weight decay: each step first multiplies the
    /// parameter by `1 − lr × weight_decay` (PyTorch's AdamW; Adam with it is AdamW).
    pub fn with_decoupled_weight_decay(mut self) -> Self {
        self.decoupled = true;
        self
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Updates `params` from `grads` with learning rate `lr`: each becomes a new tensor
    /// (clones of the old ones held elsewhere keep their values).
    pub fn step(&mut self, params: &mut [Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != grads.len() {
            return Err(Error::InvalidArgument(format!(
                "{} parameters but {} gradients",
                params.len(),
                grads.len()
            )));
        }
        if let (Rule::Muon { .. }, Some(other)) = (self.rule, params.iter().find(|p| p.rank() != 2))
        {
            return Err(Error::InvalidArgument(format!(
                "Muon updates matrices only, not a tensor of shape {:?}",
                other.dims()
            )));
        }
        let first = self.state.is_empty();
        self.step += 1;
        let t = self.step as i32;
        for (i, (param, grad)) in params.iter_mut().zip(grads).enumerate() {
            if let Rule::Muon {
                momentum,
                nesterov,
                ns_steps,
            } = self.rule
            {
                let (rows, cols) = param.dims2()?;
                if first {
                    self.state.push(vec![grad.zeros_like()?]);
                }
                let c = muon::MuonScalars {
                    momentum,
                    nesterov,
                    ns_steps,
                    lr,
                    weight_decay: self.weight_decay,
                    scale: 0.2 * (rows.max(cols) as f64).sqrt(),
                };
                let buffer = &mut self.state[i][0];
                *param = match muon::step_cpu(&mut self.workspace, param, grad, buffer, &c)? {
                    Some(new) => new,
                    None => muon::step_tensor_ops(param, grad, buffer, &c)?,
                };
                continue;
            }
            let grad = if self.weight_decay == 0.0 {
                grad.clone()
            } else if self.decoupled {
                *param = (&*param * (1.0 - lr * self.weight_decay))?;
                grad.clone()
            } else {
                (grad + (&*param * self.weight_decay)?)?
            };
            match self.rule {
                Rule::Sgd { momentum, nesterov } => {
                    let update = if momentum == 0.0 {
                        grad
                    } else {
                        let buf = if first {
                            grad.clone()
                        } else {
                            ((&self.state[i][0] * momentum)? + &grad)?
                        };
                        let update = if nesterov {
                            (&grad + (&buf * momentum)?)?
                        } else {
                            buf.clone()
                        };
                        if first {
                            self.state.push(vec![buf]);
                        } else {
                            self.state[i][0] = buf;
                        }
                        update
                    };
                    *param = (&*param - (update * lr)?)?;
                }
                Rule::Adam {
                    beta1,
                    beta2,
                    eps,
                    amsgrad,
                } => {
                    if first {
                        // Distinct buffers: the fused path updates them in place.
                        let slots = if amsgrad { 3 } else { 2 };
                        let s = (0..slots)
                            .map(|_| grad.zeros_like())
                            .collect::<candle_core::Result<_>>()?;
                        self.state.push(s);
                    }
                    let s = &mut self.state[i];
                    let scalars = AdamScalars {
                        beta1,
                        beta2,
                        eps,
                        bias1: 1.0 - beta1.powi(t),
                        bias2: 1.0 - beta2.powi(t),
                        lr,
                    };
                    if let Some(new_param) = adam_fused(param, &grad, s, scalars)? {
                        *param = new_param;
                        continue;
                    }
                    s[0] = ((&s[0] * beta1)? + (&grad * (1.0 - beta1))?)?;
                    s[1] = ((&s[1] * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                    let v = if amsgrad {
                        s[2] = s[2].maximum(&s[1])?;
                        &s[2]
                    } else {
                        &s[1]
                    };
                    let bias1 = 1.0 - beta1.powi(t);
                    let bias2 = 1.0 - beta2.powi(t);
                    let denom = ((v.sqrt()? / bias2.sqrt())? + eps)?;
                    let update = (&s[0] / denom)?;
                    *param = (&*param - (update * (lr / bias1))?)?;
                }
                Rule::Muon { .. } => unreachable!("Muon is handled above"),
            }
        }
        Ok(())
    }

    /// The state as named tensors (`{prefix}.{param}.{slot}`), for checkpoints. They share
    /// the optimiser's buffers, which later float32 CPU steps update in place: save them
    /// before the next step.
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.state
            .iter()
            .enumerate()
            .flat_map(|(i, slots)| {
                slots
                    .iter()
                    .enumerate()
                    .map(move |(j, t)| (format!("{prefix}.{i}.{j}"), t.clone()))
            })
            .collect()
    }

    /// Restores state saved by [`Optimizer::state_tensors`] with `prefix` after `steps`
    /// steps, for `params` (each state tensor must have its parameter's dtype and shape).
    pub fn restore(
        &mut self,
        steps: u64,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        params: &[&Tensor],
    ) -> Result<()> {
        let slots = match self.rule {
            Rule::Sgd { momentum, .. } => usize::from(momentum != 0.0),
            Rule::Adam { amsgrad, .. } => 2 + usize::from(amsgrad),
            Rule::Muon { .. } => 1,
        };
        self.step = steps;
        self.state.clear();
        if steps == 0 || slots == 0 {
            return Ok(());
        }
        for (i, param) in params.iter().enumerate() {
            let mut s = Vec::with_capacity(slots);
            for j in 0..slots {
                let name = format!("{prefix}.{i}.{j}");
                let t = tensors.get(&name).ok_or_else(|| {
                    Error::InvalidArgument(format!("checkpoint has no optimiser state '{name}'"))
                })?;
                if let Some(mismatch) = crate::compare::layout_mismatch(param, t) {
                    return Err(Error::InvalidArgument(format!(
                        "checkpoint optimiser state '{name}' {mismatch}, as its parameter"
                    )));
                }
                s.push(t.clone());
            }
            self.state.push(s);
        }
        Ok(())
    }
}

/// A trainer's optimisers: one over every parameter, or Muon over the weight matrices and
/// another optimiser over the rest (the biases), as the Muon recipes of sparsify and
/// tuned-lens (its PR #141) pair them. Checkpoint names: `state.*` for the optimiser of the
/// rest (of every parameter, without Muon) and `muon_state.*` for Muon's.
#[derive(Debug)]
pub struct Optimizers {
    rest: Optimizer,
    muon: Option<Optimizer>,
}

impl Optimizers {
    /// `optimizer` over every parameter.
    pub fn single(optimizer: Optimizer) -> Self {
        Optimizers {
            rest: optimizer,
            muon: None,
        }
    }

    /// `muon` (a [`Rule::Muon`] optimiser) over the matrices, `rest` over the others.
    pub fn muon_and(muon: Optimizer, rest: Optimizer) -> Result<Self> {
        if !matches!(muon.rule, Rule::Muon { .. }) {
            return Err(Error::InvalidArgument(format!(
                "the matrices' optimiser must be Muon, not {:?}",
                muon.rule
            )));
        }
        Ok(Optimizers {
            rest,
            muon: Some(muon),
        })
    }

    /// Whether Muon updates the matrices.
    pub fn has_muon(&self) -> bool {
        self.muon.is_some()
    }

    /// One step: with Muon, the matrices at `matrix_lr` and the rest at `lr`; without,
    /// every parameter at `lr`. Each updated parameter becomes a new tensor.
    pub fn step(
        &mut self,
        params: &mut [Tensor],
        grads: &[Tensor],
        lr: f64,
        matrix_lr: f64,
    ) -> Result<()> {
        let Some(muon) = &mut self.muon else {
            return self.rest.step(params, grads, lr);
        };
        if params.len() != grads.len() {
            return Err(Error::InvalidArgument(format!(
                "{} parameters but {} gradients",
                params.len(),
                grads.len()
            )));
        }
        let (matrices, rest) = matrices_and_rest(params);
        for (indices, optimizer, lr) in [(matrices, muon, matrix_lr), (rest, &mut self.rest, lr)] {
            let mut some: Vec<Tensor> = indices.iter().map(|&i| params[i].clone()).collect();
            let some_grads: Vec<Tensor> = indices.iter().map(|&i| grads[i].clone()).collect();
            optimizer.step(&mut some, &some_grads, lr)?;
            for (&i, t) in indices.iter().zip(some) {
                params[i] = t;
            }
        }
        Ok(())
    }

    /// The state as named tensors, for checkpoints (see [`Optimizer::state_tensors`]).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = self.rest.state_tensors("state");
        if let Some(muon) = &self.muon {
            tensors.extend(muon.state_tensors("muon_state"));
        }
        tensors
    }

    /// Restores state saved by [`Optimizers::state_tensors`] after `steps` steps over
    /// `params` (whose shapes say which are matrices).
    pub fn restore(
        &mut self,
        steps: u64,
        tensors: &std::collections::HashMap<String, Tensor>,
        params: &[Tensor],
    ) -> Result<()> {
        match &mut self.muon {
            None => {
                let params: Vec<&Tensor> = params.iter().collect();
                self.rest.restore(steps, tensors, "state", &params)
            }
            Some(muon) => {
                let (matrices, rest) = matrices_and_rest(params);
                let group = |indices: Vec<usize>| indices.into_iter().map(|i| &params[i]).collect();
                let (matrices, rest): (Vec<&Tensor>, Vec<&Tensor>) = (group(matrices), group(rest));
                muon.restore(steps, tensors, "muon_state", &matrices)?;
                self.rest.restore(steps, tensors, "state", &rest)
            }
        }
    }
}

/// The indices of the matrices and of the other tensors among `params`.
fn matrices_and_rest(params: &[Tensor]) -> (Vec<usize>, Vec<usize>) {
    (0..params.len()).partition(|&i| params[i].rank() == 2)
}

/// Newton-Schulz coefficients `(a, b, c)` of sparsify's quintic iteration.
const NS_COEFFICIENTS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// Muon's orthogonalisation of the matrix `g` (sparsify's `quintic_newtonschulz`): in bf16,
/// `X = g / (‖g‖_F + 1e-7)` (transposed when taller than wide), then `steps` times
/// `A = X Xᵀ; X = a X + (b A + (c A) A) X` with `(a, b, c) = (3.4445, −4.7750, 2.0315)`; every
/// operation rounds to bf16 as PyTorch's does (products: bf16 inputs, f32 sums). The result
/// approximates `U S' Vᵀ` with `S'` near 1, for `g = U S Vᵀ`. On the CPU the products run
/// through the packed bf16 kernel of [`crate::cpu::bf16`] where it beats f32 products
/// ([`crate::cpu::bf16::Kernel::beats_f32`]), else as f32 products of the widened bf16
/// values, with the element-wise steps fused around them; elsewhere, candle's bf16 tensor
/// operations.
pub fn newton_schulz(g: &Tensor, steps: usize) -> Result<Tensor> {
    if g.device().is_cpu() {
        newton_schulz_cpu(g, steps)
    } else {
        newton_schulz_tensor_ops(g, steps)
    }
}

/// [`newton_schulz`] over bf16 bits on the CPU.
fn newton_schulz_cpu(g: &Tensor, steps: usize) -> Result<Tensor> {
    use rayon::prelude::*;
    let (rows, cols) = g.dims2()?;
    let values: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut workspace = muon::Workspace::default();
    workspace.newton_schulz(&values, rows, cols, steps);
    let out: Vec<f32> = (0..rows * cols)
        .into_par_iter()
        .map(|at| workspace.result(at / cols, at % cols))
        .collect();
    Ok(Tensor::from_vec(out, (rows, cols), g.device())?.to_dtype(DType::BF16)?)
}

/// [`newton_schulz`] with candle's tensor operations (any device).
fn newton_schulz_tensor_ops(g: &Tensor, steps: usize) -> Result<Tensor> {
    let (a, b, c) = NS_COEFFICIENTS;
    let (rows, cols) = g.dims2()?;
    let tall = rows > cols;
    let mut x = g.to_dtype(DType::BF16)?;
    if tall {
        x = x.t()?.contiguous()?;
    }
    let norm = x
        .to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_dtype(DType::BF16)?;
    let norm = (norm + 1e-7)?;
    x = x.broadcast_div(&norm)?;
    // A bf16 tensor times a scalar, in f32 then rounded (candle would round the scalar).
    let times = |t: &Tensor, k: f64| -> Result<Tensor> {
        Ok((t.to_dtype(DType::F32)? * k)?.to_dtype(DType::BF16)?)
    };
    for _ in 0..steps {
        let gram = x.matmul(&x.t()?)?;
        // `b * A + c * A @ A` in Python is `b A + (c A) A`: the product of the rounded `c A`.
        let poly = (times(&gram, b)? + times(&gram, c)?.matmul(&gram)?)?;
        x = (times(&x, a)? + poly.matmul(&x)?)?;
    }
    Ok(if tall { x.t()?.contiguous()? } else { x })
}

/// The numbers of one Adam update.
#[derive(Debug, Clone, Copy)]
struct AdamScalars {
    beta1: f64,
    beta2: f64,
    eps: f64,
    bias1: f64,
    bias2: f64,
    lr: f64,
}

/// One Adam update in one pass, on the CPU ([`adam_cpu`]) or a CUDA device (`adam.cu`):
/// the new parameter and state, or `None` for the tensor-op path (other dtypes or devices).
fn adam_fused(
    param: &Tensor,
    grad: &Tensor,
    state: &mut [Tensor],
    c: AdamScalars,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Some((new_param, new_state)) = launch::adam_cuda(param, grad, state, c)? {
        state.clone_from_slice(&new_state);
        return Ok(Some(new_param));
    }
    adam_cpu(param, grad, state, c)
}

/// One Adam update in a single parallel pass when the parameter, its gradient and its state
/// (`[m, v]` or `[m, v, v_max]`) are float32 on the CPU: the state is updated in place (the
/// optimiser owns it; fresh buffers each step cost a page fault per 4 KiB, which on the
/// SAE's 19M-float matrices was a good part of the step) and the new parameter returned,
/// the same arithmetic as the tensor-op path below. `None` otherwise.
fn adam_cpu(
    param: &Tensor,
    grad: &Tensor,
    state: &[Tensor],
    c: AdamScalars,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    let state: Vec<&Tensor> = state.iter().collect();
    let p =
        crate::cpu::with_f32_slices_mut(&state, &[param, grad], |s, r| {
            let (p0, g) = (r[0], r[1]);
            let mut p = vec![0f32; p0.len()];
            let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
            let (sqrt_bias2, step) = (c.bias2.sqrt() as f32, (c.lr / c.bias1) as f32);
            const CHUNK: usize = 1 << 14;
            let (m, rest) = s.split_first_mut().expect("Adam has state");
            let (v, v_max) = rest.split_first_mut().expect("Adam has state");
            let v_max = v_max.first_mut().map(|v| &mut **v);
            let chunks = p
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .enumerate();
            let moments = |at: usize, m: &mut [f32], v: &mut [f32]| {
                for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(&g[at..]) {
                    *m = *m * b1 + g * (1.0 - b1);
                    *v = *v * b2 + g * g * (1.0 - b2);
                }
            };
            match v_max {
                None => chunks.for_each(|(chunk, ((p, m), v))| {
                    let at = chunk * CHUNK;
                    moments(at, m, v);
                    for (i, (p, &p0)) in p.iter_mut().zip(&p0[at..]).enumerate() {
                        *p = p0 - m[i] / (v[i].sqrt() / sqrt_bias2 + eps) * step;
                    }
                }),
                Some(v_max) => chunks.zip(v_max.par_chunks_mut(CHUNK)).for_each(
                    |((chunk, ((p, m), v)), v_max)| {
                        let at = chunk * CHUNK;
                        moments(at, m, v);
                        for (i, (p, &p0)) in p.iter_mut().zip(&p0[at..]).enumerate() {
                            v_max[i] = v_max[i].max(v[i]);
                            *p = p0 - m[i] / (v_max[i].sqrt() / sqrt_bias2 + eps) * step;
                        }
                    },
                ),
            }
            Ok(p)
        })?;
    p.map(|p| Ok(Tensor::from_vec(p, param.shape(), param.device())?))
        .transpose()
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (PyTorch
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Linear warm-up over `warmup` steps, then linear decay to zero at `total` steps
/// (transformers' `get_linear_schedule_with_warmup`): the learning-rate multiplier at `step`.
pub fn linear_schedule(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    (remaining / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar(t: &Tensor) -> f64 {
        t.to_vec1::<f64>().unwrap()[0]
    }

    /// The CPU Newton-Schulz (packed bf16 products, fused element-wise steps) agrees with
    /// the tensor-operation one: to a bf16 rounding after one iteration (the products' f32
    /// sums run in another order), and on average after five (which amplify such one-ulp
    /// differences), for wide, tall and odd shapes (padded reduction axis).
    #[test]
    fn newton_schulz_on_the_cpu_matches_the_tensor_operations() {
        for (rows, cols) in [(24, 80), (80, 24), (37, 101), (50, 50)] {
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
                .collect();
            let g = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
            for (steps, bound) in [(0, 0.0), (1, 1e-2), (5, 1e-2)] {
                let fast = newton_schulz_cpu(&g, steps).unwrap();
                let slow = newton_schulz_tensor_ops(&g, steps).unwrap();
                assert_eq!(fast.dims(), &[rows, cols]);
                let error = if steps == 5 {
                    crate::compare::mean_relative_difference(&fast, &slow).unwrap()
                } else {
                    crate::compare::relative_error(&fast, &slow).unwrap()
                };
                assert!(error <= bound, "{rows}x{cols}, {steps} steps: {error}");
            }
        }
    }

    /// Muon refuses anything but matrices before it changes anything; a zero gradient leaves
    /// only the decoupled weight decay (its orthogonalisation of zero is zero).
    #[test]
    fn muon_takes_matrices_and_decays_them() {
        let rule = Rule::Muon {
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
        };
        let mut opt = Optimizer::new(rule, 0.1);
        let matrix = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
        let vector = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let mut params = vec![matrix.clone(), vector.clone()];
        let grads = [matrix.zeros_like().unwrap(), vector.zeros_like().unwrap()];
        let message = opt.step(&mut params, &grads, 0.5).unwrap_err().to_string();
        assert!(
            message.contains("matrices only") && message.contains("[4]"),
            "{message}"
        );
        assert_eq!((opt.steps(), opt.state_tensors("s").len()), (0, 0));
        let mut params = vec![matrix];
        opt.step(&mut params, &grads[..1], 0.5).unwrap();
        let values: Vec<f32> = params[0].flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|&v| v == 0.95), "{values:?}");
    }

    /// Reference values from hand-unrolled PyTorch update rules on p=1, g=p (loss p²/2).
    #[test]
    fn sgd_nesterov_with_weight_decay_follows_pytorch() {
        let mut p = vec![Tensor::new(&[1.0f64], &Device::Cpu).unwrap()];
        let mut opt = Optimizer::new(
            Rule::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            0.1,
        );
        let (mut value, mut buf) = (1.0f64, 0.0f64);
        for step in 0..5 {
            let g = p[0].clone();
            opt.step(&mut p, &[g], 0.05).unwrap();
            let d = value + 0.1 * value;
            buf = if step == 0 { d } else { 0.9 * buf + d };
            value -= 0.05 * (d + 0.9 * buf);
            assert!((scalar(&p[0]) - value).abs() < 1e-12, "step {step}");
        }
    }

    #[test]
    fn adam_amsgrad_follows_pytorch_and_state_round_trips() {
        let rule = Rule::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            amsgrad: true,
        };
        let mut p = vec![Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()];
        let mut opt = Optimizer::new(rule, 0.0);
        let (mut m, mut v, mut vmax, mut value) = (0.0f64, 0.0f64, 0.0f64, 1.0f64);
        for t in 1..=4 {
            let g = p[0].clone();
            opt.step(&mut p, &[g], 0.1).unwrap();
            let g = value;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            vmax = vmax.max(v);
            let denom = vmax.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
            value -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
            assert!((scalar(&p[0]) - value).abs() < 1e-12);
        }
        let saved: std::collections::HashMap<String, Tensor> =
            opt.state_tensors("state").into_iter().collect();
        let mut restored = Optimizer::new(rule, 0.0);
        restored
            .restore(opt.steps(), &saved, "state", &[&p[0]])
            .unwrap();
        // State of another shape or dtype than its parameter is refused, by name.
        let mut damaged = saved.clone();
        damaged.insert(
            "state.0.1".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Optimizer::new(rule, 0.0)
            .restore(opt.steps(), &damaged, "state", &[&p[0]])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'state.0.1' must be") && err.contains("got F32 [2]"),
            "{err}"
        );
        let (mut a, mut b) = (p.clone(), p.clone());
        let g = p[0].clone();
        opt.step(&mut a, std::slice::from_ref(&g), 0.1).unwrap();
        restored.step(&mut b, &[g], 0.1).unwrap();
        assert_eq!(
            a[0].to_vec1::<f64>().unwrap(),
            b[0].to_vec1::<f64>().unwrap()
        );
    }

    /// PyTorch's AdamW, hand-unrolled: the parameter shrinks by `lr × weight_decay` first and
    /// the gradient is left alone; and [`Optimizers::muon_and`] takes only a Muon optimiser
    /// for the matrices.
    #[test]
    fn decoupled_adam_follows_pytorch_adamw() {
        let rule = Rule::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            amsgrad: false,
        };
        let mut p = vec![Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()];
        let mut opt = Optimizer::new(rule, 0.5).with_decoupled_weight_decay();
        let (mut m, mut v, mut value) = (0.0f64, 0.0f64, 1.0f64);
        for t in 1..=4 {
            let g = (&p[0] * 3.0).unwrap();
            opt.step(&mut p, &[g], 0.1).unwrap();
            let g = 3.0 * value;
            value *= 1.0 - 0.1 * 0.5;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let denom = v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
            value -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
            assert!((scalar(&p[0]) - value).abs() < 1e-12, "step {t}");
        }
        let err = Optimizers::muon_and(Optimizer::new(rule, 0.0), Optimizer::new(rule, 0.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be Muon"), "{err}");
    }

    /// The float32 CPU pass gives what the tensor-op path gives (run in f64 here).
    #[test]
    fn adam_f32_fast_path_matches_the_tensor_ops() {
        for amsgrad in [false, true] {
            let rule = Rule::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                amsgrad,
            };
            let values: Vec<f32> = (0..40_000)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let p32 = Tensor::from_vec(values, (200, 200), &Device::Cpu).unwrap();
            let mut fast = vec![p32.clone()];
            let mut slow = vec![p32.to_dtype(candle_core::DType::F64).unwrap()];
            let (mut opt_fast, mut opt_slow) =
                (Optimizer::new(rule, 0.0), Optimizer::new(rule, 0.0));
            for step in 0..4 {
                // Gradient: the parameter times a step-dependent factor (moves v_max around).
                let g = (&fast[0] * (1.0 - 0.6 * step as f64)).unwrap();
                let (kept, kept_values) = (fast[0].clone(), fast[0].flatten_all().unwrap());
                let kept_values = kept_values.to_vec1::<f32>().unwrap();
                opt_fast
                    .step(&mut fast, std::slice::from_ref(&g), 0.01)
                    .unwrap();
                let kept = kept.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(kept, kept_values, "the step made a new parameter tensor");
                let g = g.to_dtype(candle_core::DType::F64).unwrap();
                opt_slow.step(&mut slow, &[g], 0.01).unwrap();
                let diff = crate::compare::max_abs_diff(&fast[0], &slow[0]).unwrap();
                assert!(diff < 1e-5, "amsgrad {amsgrad} step {step}: {diff}");
                slow[0] = fast[0].to_dtype(candle_core::DType::F64).unwrap();
            }
            assert_eq!(
                opt_fast.state_tensors("state").len(),
                2 + usize::from(amsgrad)
            );
        }
    }

    #[test]
    fn clipping_and_schedule() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((g[0].to_vec1::<f32>().unwrap()[0] - 0.6).abs() < 1e-5);
        assert_eq!(linear_schedule(0, 0, 250), 1.0);
        assert_eq!(linear_schedule(125, 0, 250), 0.5);
        assert_eq!(linear_schedule(5, 10, 110), 0.5);
        assert_eq!(linear_schedule(60, 10, 110), 0.5);
        assert_eq!(linear_schedule(300, 0, 250), 0.0);
    }
}
