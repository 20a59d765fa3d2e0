//! Optimisers with saveable state, gradient clipping and learning-rate schedules, for the
//! trainers that compute their gradients by hand (lens, SAE). candle-nn's optimisers cannot
//! save their state and its SGD has no momentum; these follow PyTorch's update rules exactly.

use candle_core::Tensor;

use crate::{Error, Result};

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
}

/// An optimiser over a fixed list of parameter tensors. Weight decay is coupled (added to
/// the gradient), as in PyTorch's SGD and Adam.
#[derive(Debug, Clone)]
pub struct Optimizer {
    rule: Rule,
    weight_decay: f64,
    step: u64,
    /// Per parameter: SGD `[momentum]`; Adam `[m, v]` or `[m, v, v_max]`.
    state: Vec<Vec<Tensor>>,
}

impl Optimizer {
    /// A fresh optimiser (state is created on the first step).
    pub fn new(rule: Rule, weight_decay: f64) -> Self {
        Optimizer {
            rule,
            weight_decay,
            step: 0,
            state: Vec::new(),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Updates `params` in place from `grads` with learning rate `lr`.
    pub fn step(&mut self, params: &mut [Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != grads.len() {
            return Err(Error::InvalidArgument(format!(
                "{} parameters but {} gradients",
                params.len(),
                grads.len()
            )));
        }
        let first = self.state.is_empty();
        self.step += 1;
        let t = self.step as i32;
        for (i, (param, grad)) in params.iter_mut().zip(grads).enumerate() {
            let grad = if self.weight_decay != 0.0 {
                (grad + (&*param * self.weight_decay)?)?
            } else {
                grad.clone()
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
                        let zeros = grad.zeros_like()?;
                        let mut s = vec![zeros.clone(), zeros.clone()];
                        if amsgrad {
                            s.push(zeros);
                        }
                        self.state.push(s);
                    }
                    let s = &mut self.state[i];
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
            }
        }
        Ok(())
    }

    /// The state as named tensors (`state.{param}.{slot}`) plus the step count, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.state
            .iter()
            .enumerate()
            .flat_map(|(i, slots)| {
                slots
                    .iter()
                    .enumerate()
                    .map(move |(j, t)| (format!("state.{i}.{j}"), t.clone()))
            })
            .collect()
    }

    /// Restores state saved by [`Optimizer::state_tensors`] after `steps` steps.
    pub fn restore(
        &mut self,
        steps: u64,
        tensors: &std::collections::HashMap<String, Tensor>,
        params: usize,
    ) -> Result<()> {
        let slots = match self.rule {
            Rule::Sgd { momentum, .. } => usize::from(momentum != 0.0),
            Rule::Adam { amsgrad, .. } => 2 + usize::from(amsgrad),
        };
        self.step = steps;
        self.state.clear();
        if steps == 0 || slots == 0 {
            return Ok(());
        }
        for i in 0..params {
            let mut s = Vec::with_capacity(slots);
            for j in 0..slots {
                let name = format!("state.{i}.{j}");
                let t = tensors.get(&name).ok_or_else(|| {
                    Error::InvalidArgument(format!("checkpoint has no optimiser state '{name}'"))
                })?;
                s.push(t.clone());
            }
            self.state.push(s);
        }
        Ok(())
    }
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
            opt.state_tensors().into_iter().collect();
        let mut restored = Optimizer::new(rule, 0.0);
        restored.restore(opt.steps(), &saved, 1).unwrap();
        let (mut a, mut b) = (p.clone(), p.clone());
        let g = p[0].clone();
        opt.step(&mut a, std::slice::from_ref(&g), 0.1).unwrap();
        restored.step(&mut b, &[g], 0.1).unwrap();
        assert_eq!(
            a[0].to_vec1::<f64>().unwrap(),
            b[0].to_vec1::<f64>().unwrap()
        );
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
