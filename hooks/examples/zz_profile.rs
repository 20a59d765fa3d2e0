use candle_core::{DType, Device, Tensor, D};
use std::time::Instant;
fn t<F: FnMut() -> candle_core::Result<Tensor>>(name: &str, n: usize, mut f: F) {
    f().unwrap();
    let s = Instant::now();
    for _ in 0..n {
        f().unwrap();
    }
    println!(
        "{name}: {:.1} ms",
        s.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
}
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (4, 512, 768), &dev)?;
    let w = Tensor::randn(0f32, 1., (2304, 768), &dev)?;
    let w2 = Tensor::randn(0f32, 1., (3072, 768), &dev)?;
    let wu = Tensor::randn(0f32, 1., (50304, 768), &dev)?;
    let lin = candle_nn::Linear::new(w.clone(), None);
    use candle_nn::Module;
    t("linear3d qkv", 5, || lin.forward(&x));
    t("2d matmul qkv", 5, || {
        x.reshape((2048, 768))?.matmul(&w.t()?)
    });
    t("2d matmul mlp_in", 5, || {
        x.reshape((2048, 768))?.matmul(&w2.t()?)
    });
    t("2d unembed", 2, || x.reshape((2048, 768))?.matmul(&wu.t()?));
    let h = Tensor::randn(0f32, 1., (2048, 3072), &dev)?;
    t("gelu_erf", 5, || h.gelu_erf());
    t("gelu tanh", 5, || h.gelu());
    let q = Tensor::randn(0f32, 1., (4, 12, 512, 64), &dev)?;
    t("scores", 5, || q.matmul(&q.t()?));
    t("scores contig k", 5, || q.matmul(&q.t()?.contiguous()?));
    let s = Tensor::randn(0f32, 1., (4, 12, 512, 512), &dev)?;
    t("softmax", 5, || candle_nn::ops::softmax_last_dim(&s));
    t("pv", 5, || s.matmul(&q));
    let ln_w = Tensor::ones(768, DType::F32, &dev)?;
    let ln_b = Tensor::zeros(768, DType::F32, &dev)?;
    t("layernorm", 5, || {
        candle_nn::ops::layer_norm(&x, &ln_w, &ln_b, 1e-5)
    });
    t("transpose contig", 5, || q.transpose(1, 2)?.contiguous());
    let _ = D::Minus1;
    Ok(())
}
