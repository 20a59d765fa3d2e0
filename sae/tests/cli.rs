//! The `sae` command line end to end, in-process, on a tiny synthetic GPT-NeoX over real
//! text: `sae train` (two hook points in one pass) writes sparsify's layout, re-running
//! resumes (exactly, after an interruption), `sae train --activations` reads a cache, and
//! `sae eval` reports FVU, L0, dead latents and the CE loss recovered.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use hooks::data::DataSpec;
use sae::{Sae, SaeConfig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tiny GPT-NeoX folder with synthetic weights and the real Pythia tokenizer.
fn model_folder(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    let config = hooks::synthetic::tiny_gpt_neox_config(2);
    hooks::synthetic::write_synthetic_model(
        &model,
        &config,
        Some(&repo().join("data/gpt-neox-20b-tokenizer.json")),
    )
    .unwrap();
    model
}

fn sae_cli(args: &[&str]) -> anyhow::Result<()> {
    sae::cli::run(std::iter::once("sae").chain(args.iter().copied()))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn flat(sae: &Sae) -> Vec<f32> {
    sae.parameters()
        .iter()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// `hooks cache` of `hookpoints` over the first 1024 tokens of WikiText-2 (sequences of 64)
/// into `dir/cache`.
fn cache_of_text(dir: &Path, model: &Path, hookpoints: &str) -> PathBuf {
    let cache = dir.join("cache");
    let text = repo().join("data/wikitext-2-raw-test.txt");
    let args = [
        "hooks",
        "cache",
        "--model",
        s(model),
        "--hookpoints",
        hookpoints,
        "--data",
    ];
    let rest = [
        "--seq-len",
        "64",
        "--max-tokens",
        "1024",
        "--output",
        s(&cache),
    ];
    hooks::cli::run(args.into_iter().chain([s(&text)]).chain(rest)).unwrap();
    cache
}

/// `sae train --activations cache --output output` with `extra` arguments.
fn train_on_cache(cache: &Path, output: &Path, extra: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["train", "--activations", s(cache), "--output", s(output)];
    args.extend(extra);
    sae_cli(&args)
}

/// The per-step records `sae train` wrote for hook point `point` under `out`.
fn read_history(out: &Path, point: &str) -> Vec<serde_json::Value> {
    let path = out.join("checkpoints").join(point).join("history.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The first lines of the wikitext test set that make between 14 and 20 sequences of 64
/// tokens: enough for 3 steps of 256 tokens, not for 5.
fn truncated_text(dir: &Path, model: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("data/wikitext-2-raw-test.txt")).unwrap();
    let tokenizer = hooks::Tokenizer::from_file(&model.join("tokenizer.json"), Some(0)).unwrap();
    let path = dir.join("short.txt");
    let lines: Vec<&str> = text.lines().collect();
    for n in (10..lines.len()).step_by(5) {
        std::fs::write(&path, lines[..n].join("\n")).unwrap();
        let mut chunks = DataSpec::new(vec![path.clone()], 64)
            .chunks(Some(&tokenizer))
            .unwrap();
        let count = chunks.next_chunks(100).unwrap().len();
        if count >= 14 {
            assert!(count <= 20, "{count} sequences");
            return path;
        }
    }
    panic!("the text is too short");
}

#[test]
fn train_resume_and_eval_on_a_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let text = repo().join("data/wikitext-2-raw-test.txt");
    let train_args = |output: &Path, data: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            s(&model),
            "--hookpoints",
            "layers.0,layers.1.mlp",
            "--data",
            s(data),
            "--output",
            s(output),
            "--seq-len",
            "64",
            "--forward-batch",
            "4",
            "--batch-size",
            "256",
            "--steps",
            "6",
            "--k",
            "4",
            "--expansion-factor",
            "2",
            "--lr",
            "1e-2",
            "--lr-warmup-steps",
            "2",
            "--checkpoint-every",
            "3",
            // In data order: the interrupted run below is resumed with more data, which a
            // shuffle would draw from in another order.
            "--shuffle-sequences",
            "1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let call = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        sae_cli(&refs)
    };

    // Straight through.
    let out = tmp.path().join("run1");
    call(train_args(&out, &text)).unwrap();
    let points = ["layers.0", "layers.1.mlp"];
    let trained: Vec<Sae> = points
        .iter()
        .map(|p| Sae::load(&out.join(p), &Device::Cpu).unwrap())
        .collect();
    for sae in &trained {
        assert_eq!((sae.d_in(), sae.num_latents(), sae.k()), (32, 64, 4));
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(points[0]).join("cfg.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["expansion_factor"], 2);
    }
    assert_ne!(flat(&trained[0]), flat(&trained[1]));
    let history = read_history(&out, "layers.1.mlp");
    assert_eq!(history.len(), 6);

    // Re-running a finished run changes nothing.
    call(train_args(&out, &text)).unwrap();
    let again = Sae::load(&out.join(points[1]), &Device::Cpu).unwrap();
    assert_eq!(flat(&again), flat(&trained[1]));
    // Trained SAEs that no checkpoint accounts for are not overwritten.
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(bare.join(points[1])).unwrap();
    std::fs::copy(
        out.join(points[1]).join("cfg.json"),
        bare.join(points[1]).join("cfg.json"),
    )
    .unwrap();
    let message = format!("{:#}", call(train_args(&bare, &text)).unwrap_err());
    assert!(
        message.contains("holds the result of another run"),
        "{message}"
    );

    // Interrupted (the data runs out after the checkpoint of step 3), then resumed.
    let short = truncated_text(tmp.path(), &model);
    let out2 = tmp.path().join("run2");
    let message = format!("{:#}", call(train_args(&out2, &short)).unwrap_err());
    assert!(message.contains("ran out during step"), "{message}");
    assert!(!out2.join(points[0]).join("sae.safetensors").exists());
    // Resuming over changed data (one word early on) is refused.
    let changed = tmp.path().join("changed.txt");
    let original = std::fs::read_to_string(&text).unwrap();
    std::fs::write(&changed, original.replacen(" the ", " a ", 1)).unwrap();
    let message = format!("{:#}", call(train_args(&out2, &changed)).unwrap_err());
    assert!(message.contains("was made from other data"), "{message}");
    // Resumed with the tokens encoded at once lowered (a memory bound, which only reorders
    // the sums of a step): the same SAEs up to rounding. Exact resumes: tests/train.rs.
    let mut smaller_chunks = train_args(&out2, &text);
    smaller_chunks.extend(["--chunk-tokens".to_string(), "64".to_string()]);
    call(smaller_chunks).unwrap();
    for (p, sae) in points.iter().zip(&trained) {
        let resumed = flat(&Sae::load(&out2.join(p), &Device::Cpu).unwrap());
        let worst = resumed
            .iter()
            .zip(flat(sae))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{p}: {worst}");
    }

    // Evaluation with the SAEs spliced in.
    let json = tmp.path().join("eval.json");
    call(
        [
            "eval",
            "--model",
            s(&model),
            "--sae",
            s(&out),
            "--data",
            s(&text),
            "--seq-len",
            "64",
            "--forward-batch",
            "4",
            "--tokens",
            "256",
            "--json",
            s(&json),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
    )
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["tokens"], 256);
    // An SAE of another width, and a mistyped local path, get messages that say so.
    let narrow = tmp.path().join("narrow");
    Sae::new(SaeConfig::new(16, 32, 4), 0, &Device::Cpu)
        .unwrap()
        .save(&narrow.join("layers.0"))
        .unwrap();
    // A failing `sae eval` of `sae` on `data`, with `extra` arguments: its message.
    let eval_error = |sae: &Path, data: &Path, extra: &[&str]| {
        let args = [
            "eval",
            "--model",
            s(&model),
            "--sae",
            s(sae),
            "--data",
            s(data),
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--seq-len", "64", "--tokens", "64"].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        format!("{:#}", call(args).unwrap_err())
    };
    let message = eval_error(&narrow, &text, &[]);
    assert!(
        message.contains("reads 16-wide activations, but this model's layers.0 are 32 wide"),
        "{message}"
    );
    // Every token left out: an error, not NaN metrics.
    let same = tmp.path().join("same.txt");
    std::fs::write(&same, "the the the the\n".repeat(200)).unwrap();
    let tokenizer = hooks::Tokenizer::from_file(&model.join("tokenizer.json"), Some(0)).unwrap();
    let mut ids = tokenizer.encode("the the the the").unwrap();
    ids.push(0);
    ids.sort();
    ids.dedup();
    let exclude = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let message = eval_error(&out, &same, &["--exclude-tokens", &exclude]);
    assert!(message.contains("tokens was left out"), "{message}");
    // A token id past the model's vocabulary is named with its file and place in the data.
    let ids = tmp.path().join("ids.bin");
    let mut tokens = [7u16; 128];
    tokens[9] = 60000;
    std::fs::write(
        &ids,
        tokens
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let message = eval_error(&out, &ids, &[]);
    assert!(
        message.contains("ids.bin: token id 60000 at position 9 of sequence 0 (the data packed"),
        "{message}"
    );
    // An SAE folder named after an attention pattern: patterns have no row per token.
    std::fs::rename(
        narrow.join("layers.0"),
        narrow.join("layers.0.attention.pattern"),
    )
    .unwrap();
    let message = eval_error(&narrow, &text, &[]);
    assert!(
        message.contains("'layers.0.attention.pattern' is an attention pattern"),
        "{message}"
    );
    let mut args = train_args(&tmp.path().join("pattern-saes"), &text);
    let at = args.iter().position(|a| a == "--hookpoints").unwrap() + 1;
    args[at] = "layers.*.attention.pattern".into();
    let message = format!("{:#}", call(args).unwrap_err());
    assert!(message.contains("is an attention pattern"), "{message}");
    // A missing local folder is named as such, before the model loads, not looked up on
    // the hub.
    let message = eval_error(&tmp.path().join("no-such-saes"), &text, &[]);
    assert!(
        message.contains("--sae") && message.contains("no-such-saes: no such folder"),
        "{message}"
    );
    let rows = report["saes"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["hookpoint"], "layers.0");
    assert_eq!(rows[1]["hookpoint"], "layers.1.mlp");
    let clean = report["ce_clean"].as_f64().unwrap();
    assert!(clean.is_finite() && clean > 0.0);
    for row in rows {
        let f = |k: &str| row[k].as_f64().unwrap();
        assert!(f("fvu") > 0.0 && f("fvu") < 1.5, "{row}");
        assert!((f("explained_variance") - (1.0 - f("fvu"))).abs() < 1e-12);
        assert!(f("l0") > 0.0 && f("l0") <= 4.0, "{row}");
        assert!((0.0..=100.0).contains(&f("dead_pct")), "{row}");
        let recovered = (f("ce_zero") - f("ce_sae")) / (f("ce_zero") - clean);
        assert!((recovered - f("ce_loss_recovered")).abs() < 1e-9, "{row}");
        assert!(f("ce_sae").is_finite() && f("ce_zero").is_finite());
    }
}

#[test]
fn train_from_an_activation_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let cache = cache_of_text(tmp.path(), &model, "layers.0,layers.1");
    let out = tmp.path().join("saes");
    let args = [
        "train",
        "--activations",
        s(&cache),
        "--hookpoints",
        "layers.1",
        "--output",
        s(&out),
        "--batch-size",
        "256",
        "--num-latents",
        "48",
        "--k",
        "3",
        "--multi-topk",
        "--auxk-alpha",
        "0.03125",
        "--lr-warmup-steps",
        "1",
    ];
    sae_cli(&args).unwrap();
    let sae = Sae::load(&out.join("layers.1"), &Device::Cpu).unwrap();
    assert_eq!((sae.d_in(), sae.num_latents(), sae.k()), (32, 48, 3));
    assert!(sae.config().multi_topk);
    assert!(!out.join("layers.0").exists());
    // The whole cache: 1024 tokens = 4 steps.
    let history = read_history(&out, "layers.1");
    assert_eq!(history.len(), 4);
    // A hook point the cache lacks is refused by name.
    let mut bad = args.to_vec();
    bad[4] = "layers.0.mlp";
    let message = format!("{:#}", sae_cli(&bad).unwrap_err());
    assert!(message.contains("layers.0.mlp"), "{message}");
    // More steps than the cache holds are refused before the first step.
    let more = tmp.path().join("more");
    let mut five_steps = args.to_vec();
    five_steps[6] = s(&more);
    five_steps.extend(["--steps", "5"]);
    let message = format!("{:#}", sae_cli(&five_steps).unwrap_err());
    assert!(
        message.contains("the data holds 1024 tokens, but 5 steps x 256 tokens per step need 1280"),
        "{message}"
    );
    // An output that cannot be a folder fails before training too.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let mut into_file = args.to_vec();
    into_file[6] = s(&file);
    let message = format!("{:#}", sae_cli(&into_file).unwrap_err());
    assert!(message.contains("a-file/checkpoints/layers.1"), "{message}");
}

/// `sae train --transcode --skip-connection`: an MLP skip transcoder (input
/// `layers.1.mlp.input`, target `layers.1.mlp`) streamed from the model, saved with
/// `transcode: true` and a trained `W_skip`; `sae eval`
/// measures its FVU against the MLP output from the MLP input (checked against a direct
/// computation on captures of both points) and splices its prediction in; a non-MLP hook
/// point is refused by name.
#[test]
fn transcoder_train_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = model_folder(tmp.path());
    let text = repo().join("data/wikitext-2-raw-test.txt");
    let out = tmp.path().join("tc");
    let common = [
        "--model",
        s(&model_dir),
        "--data",
        s(&text),
        "--seq-len",
        "64",
        "--forward-batch",
        "4",
    ];
    let mut args = vec![
        "train",
        "--transcode",
        "--skip-connection",
        "--hookpoints",
        "layers.1.mlp",
    ];
    args.extend(common);
    args.extend([
        "--output",
        s(&out),
        "--batch-size",
        "256",
        "--steps",
        "4",
        "--k",
        "4",
        "--expansion-factor",
        "2",
        "--lr",
        "1e-2",
        "--lr-warmup-steps",
        "1",
    ]);
    sae_cli(&args).unwrap();
    let tc = Sae::load(&out.join("layers.1.mlp"), &Device::Cpu).unwrap();
    assert!(tc.config().transcode && tc.config().skip_connection);
    // W_skip starts at zero; steps 2 to 4 (step 1 has lr 0) moved it.
    let w_skip = tc.w_skip().unwrap().abs().unwrap().max_all().unwrap();
    assert!(w_skip.to_scalar::<f32>().unwrap() > 1e-3);
    let history = read_history(&out, "layers.1.mlp");
    assert_eq!(history.len(), 4);
    // Zero decoder at init: the first prediction is b_dec = the target mean, FVU 1.
    assert!((history[0]["fvu"].as_f64().unwrap() - 1.0).abs() < 1e-5);

    let json = tmp.path().join("eval.json");
    let mut args = vec![
        "eval",
        "--sae",
        s(&out),
        "--tokens",
        "256",
        "--json",
        s(&json),
    ];
    args.extend(common);
    sae_cli(&args).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let row = &report["saes"][0];
    assert_eq!(row["hookpoint"], "layers.1.mlp");

    // The same FVU from captures of the MLP's input and output over the same 4 x 64 tokens.
    let model = hooks::cli::ModelArgs {
        model: s(&model_dir).into(),
        revision: None,
        device: "cpu".into(),
        dtype: "float32".into(),
        quantized: false,
        tokenizer: None,
    }
    .load()
    .unwrap();
    let mut chunks = DataSpec::new(vec![text.clone()], 64)
        .chunks(model.tokenizer().ok())
        .unwrap();
    let ids: Vec<u32> = chunks.next_chunks(4).unwrap().concat();
    let ids = candle_core::Tensor::from_vec(ids, (4, 64), &Device::Cpu).unwrap();
    let (input, target) = (hooks::HookPoint::MlpInput(1), hooks::HookPoint::Mlp(1));
    let mut capture = hooks::Hooks::capture_only([input, target]);
    let captured = model.forward(&ids, &mut capture).unwrap().captures;
    let rows = |p| captured[&p].reshape((256, 32)).unwrap();
    let direct = tc.forward_target(&rows(input), &rows(target)).unwrap().fvu;
    let reported = row["fvu"].as_f64().unwrap();
    assert!(
        (direct - reported).abs() < 1e-4 * direct,
        "{direct} vs {reported}"
    );
    let f = |k: &str| row[k].as_f64().unwrap();
    assert!(f("ce_sae").is_finite() && f("ce_sae") > 0.0);
    assert!(f("ce_sae") != report["ce_clean"].as_f64().unwrap());

    let mut args = vec!["train", "--transcode", "--hookpoints", "layers.1"];
    args.extend(common);
    let bad = tmp.path().join("bad");
    args.extend(["--output", s(&bad), "--steps", "1"]);
    let message = format!("{:#}", sae_cli(&args).unwrap_err());
    assert!(
        message.contains("layers.N.mlp") && message.contains("layers.1"),
        "{message}"
    );
}

/// `--skip-first-positions`: `sae train --activations` leaves out position 0 of each cached
/// sequence (fewer rows, so fewer default steps), the checkpoint refuses a re-run without
/// the flag, and `sae eval` measures the FVU on positions >= 1 only and splices the SAE
/// there only (both checked against direct computations on captured activations).
#[test]
fn skip_first_positions_in_train_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = model_folder(tmp.path());
    let text = repo().join("data/wikitext-2-raw-test.txt");
    let cache = cache_of_text(tmp.path(), &model_dir, "layers.1");
    let out = tmp.path().join("saes");
    let train = |output: &Path, skip: &str| {
        let common = [
            "--batch-size",
            "252",
            "--num-latents",
            "48",
            "--k",
            "3",
            "--lr",
            "1e-2",
            "--lr-warmup-steps",
            "1",
            "--skip-first-positions",
        ];
        train_on_cache(&cache, output, &[&common[..], &[skip]].concat())
    };
    train(&out, "1").unwrap();
    // 16 sequences of 63 rows kept = 1008 rows = 4 steps of 252 (without skipping: 1024
    // rows, still 4 steps; with 2 skipped, 992 rows: 3 steps).
    let history = read_history(&out, "layers.1");
    assert_eq!(history.len(), 4);
    let message = format!("{:#}", train(&out, "2").unwrap_err());
    assert!(
        message.contains("skipping the first 1 positions") && message.contains("skips 2"),
        "{message}"
    );
    let two = tmp.path().join("two");
    train(&two, "2").unwrap();
    let history = read_history(&two, "layers.1");
    assert_eq!(history.len(), 3);
    let message = format!("{:#}", train(&two, "64").unwrap_err());
    assert!(message.contains("leaves nothing of 64-token"), "{message}");

    // Streaming from the model: half of each 64-token sequence skipped, so 2 steps of 256
    // rows need 16 sequences (the stream is sized in rows kept, not tokens). Without
    // --hookpoints, sparsify's default: every layer's output.
    let streamed = tmp.path().join("streamed");
    sae_cli(&[
        "train",
        "--model",
        s(&model_dir),
        "--data",
        s(&text),
        "--seq-len",
        "64",
        "--forward-batch",
        "4",
        "--output",
        s(&streamed),
        "--batch-size",
        "256",
        "--steps",
        "2",
        "--num-latents",
        "48",
        "--k",
        "3",
        "--skip-first-positions",
        "32",
    ])
    .unwrap();
    for layer in ["layers.0", "layers.1"] {
        assert!(streamed.join(layer).join("sae.safetensors").is_file());
    }

    // Evaluation from position 1 on: `evaluate(extra)` runs `sae eval` and returns its report.
    let evaluate = |extra: &[&str]| -> serde_json::Value {
        let json = tmp.path().join("eval.json");
        let mut args = vec![
            "eval",
            "--model",
            s(&model_dir),
            "--sae",
            s(&out),
            "--data",
            s(&text),
            "--seq-len",
            "64",
            "--forward-batch",
            "4",
            "--tokens",
            "256",
            "--skip-first-positions",
            "1",
            "--json",
            s(&json),
        ];
        args.extend(extra);
        sae_cli(&args).unwrap();
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    let report = evaluate(&[]);
    assert_eq!(report["tokens"], 256);
    assert_eq!(report["skip_first_positions"], 1);
    let row = &report["saes"][0];
    let sae = Sae::load(&out.join("layers.1"), &Device::Cpu).unwrap();
    let model = hooks::cli::ModelArgs {
        model: s(&model_dir).into(),
        revision: None,
        device: "cpu".into(),
        dtype: "float32".into(),
        quantized: false,
        tokenizer: None,
    }
    .load()
    .unwrap();
    let ids: Vec<u32> = DataSpec::new(vec![text.clone()], 64)
        .chunks(model.tokenizer().ok())
        .unwrap()
        .next_chunks(4)
        .unwrap()
        .concat();
    let ids = Tensor::from_vec(ids, (4, 64), &Device::Cpu).unwrap();
    let point = hooks::HookPoint::Layer(1);
    let captured = model
        .forward(&ids, &mut hooks::Hooks::capture_only([point]))
        .unwrap()
        .captures[&point]
        .clone();
    let later = captured
        .narrow(1, 1, 63)
        .unwrap()
        .reshape((252, 32))
        .unwrap();
    let direct = sae.forward(&later).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-4 * b.abs();
    let f = |k: &str| row[k].as_f64().unwrap();
    assert!(
        close(f("fvu"), direct.fvu),
        "{} vs {}",
        f("fvu"),
        direct.fvu
    );
    let active: f32 = direct
        .top_acts
        .gt(0.0)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(close(f("l0"), active as f64 / 252.0));
    // Dead: latents never among the active top-k on the evaluated rows.
    let acts: Vec<f32> = direct.top_acts.flatten_all().unwrap().to_vec1().unwrap();
    let indices: Vec<u32> = direct.top_indices.flatten_all().unwrap().to_vec1().unwrap();
    let fired: std::collections::BTreeSet<u32> = indices
        .iter()
        .zip(&acts)
        .filter(|(_, &a)| a > 0.0)
        .map(|(&i, _)| i)
        .collect();
    let n = sae.num_latents() as f64;
    let dead_pct = 100.0 * (n - fired.len() as f64) / n;
    assert!(
        (f("dead_pct") - dead_pct).abs() < 1e-9,
        "{} vs {dead_pct}",
        f("dead_pct")
    );
    // CE with position 0 left as the model made it and positions >= 1 reconstructed, or
    // zeroed, by hand.
    let ce_of = |patched: Tensor| -> f64 {
        let mut hooks = hooks::Hooks::new().replace(point, |_: &Tensor| Ok(Some(patched.clone())));
        let logits = model.forward(&ids, &mut hooks).unwrap().logits.unwrap();
        let logits: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
        let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        let mut total = 0.0f64;
        for (seq, tokens) in logits.iter().zip(&ids) {
            for t in 0..63 {
                let row = &seq[t];
                let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                total += lse - row[tokens[t + 1] as usize] as f64;
            }
        }
        total / (4.0 * 63.0)
    };
    let ce_with = |rest: Tensor| -> f64 {
        let first = captured.narrow(1, 0, 1).unwrap();
        ce_of(Tensor::cat(&[&first, &rest.reshape((4, 63, 32)).unwrap()], 1).unwrap())
    };
    let ce_sae = ce_with(direct.x_hat.clone());
    let ce_zero = ce_with(later.zeros_like().unwrap());
    let ce_clean = ce_of(captured.clone());
    let clean = report["ce_clean"].as_f64().unwrap();
    assert!(close(clean, ce_clean), "{clean} vs {ce_clean}");
    assert!(close(f("ce_sae"), ce_sae), "{} vs {ce_sae}", f("ce_sae"));
    assert!(
        close(f("ce_zero"), ce_zero),
        "{} vs {ce_zero}",
        f("ce_zero")
    );

    // With --exclude-tokens as well: the rows of the most frequent token are left out of
    // the metrics and keep the model's activations in the splice.
    let flat_ids: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    let frequent = (0..flat_ids.len())
        .map(|i| flat_ids[i])
        .max_by_key(|id| flat_ids.iter().filter(|x| *x == id).count())
        .unwrap();
    let kept: Vec<u32> = (0..256u32)
        .filter(|&r| r % 64 != 0 && flat_ids[r as usize] != frequent)
        .collect();
    assert!(kept.len() < 252, "{}", kept.len());
    let report = evaluate(&["--exclude-tokens", &frequent.to_string()]);
    assert_eq!(report["exclude_tokens"], serde_json::json!([frequent]));
    let row = &report["saes"][0];
    let f = |k: &str| row[k].as_f64().unwrap();
    let all_rows = captured.reshape((256, 32)).unwrap();
    let index = Tensor::new(kept.as_slice(), &Device::Cpu).unwrap();
    let direct = sae
        .forward(&all_rows.index_select(&index, 0).unwrap())
        .unwrap();
    assert!(
        close(f("fvu"), direct.fvu),
        "{} vs {}",
        f("fvu"),
        direct.fvu
    );
    let mask: Vec<u8> = (0..256u32).map(|r| u8::from(kept.contains(&r))).collect();
    let mask = Tensor::from_vec(mask, (4, 64, 1), &Device::Cpu)
        .unwrap()
        .broadcast_as((4, 64, 32))
        .unwrap();
    let recon = sae
        .forward(&all_rows)
        .unwrap()
        .x_hat
        .reshape((4, 64, 32))
        .unwrap();
    let ce_sae = ce_of(mask.where_cond(&recon, &captured).unwrap());
    assert!(close(f("ce_sae"), ce_sae), "{} vs {ce_sae}", f("ce_sae"));
    let clean = report["ce_clean"].as_f64().unwrap();
    assert!(close(clean, ce_clean), "{clean} vs {ce_clean}");
    let ce_zero = ce_of(
        mask.where_cond(&captured.zeros_like().unwrap(), &captured)
            .unwrap(),
    );
    assert!(
        close(f("ce_zero"), ce_zero),
        "{} vs {ce_zero}",
        f("ce_zero")
    );
}

/// `sae train --finetune DIR`: the SAEs in DIR (as `sae train` wrote them) are trained
/// further with their own shape and options; their biases are kept, so a first step at lr 0
/// (the warm-up's) leaves them as they were, where a fresh run would reset `b_dec`. A DIR
/// without the hook point, and a transcoder run on an autoencoder, are refused with the path.
#[test]
fn finetune_trains_saes_further() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = model_folder(tmp.path());
    let points = "layers.1,layers.1.mlp.input,layers.1.mlp";
    let cache = cache_of_text(tmp.path(), &model_dir, points);
    let train = |output: &Path, extra: &[&str]| {
        let common = [
            "--batch-size",
            "256",
            "--lr",
            "1e-2",
            "--lr-warmup-steps",
            "1",
        ];
        train_on_cache(&cache, output, &[&common[..], extra].concat())
    };
    let both = "layers.1,layers.1.mlp";
    let shape = ["--num-latents", "48", "--k", "3"];
    let first = tmp.path().join("first");
    let args = [&["--hookpoints", both, "--steps", "3"][..], &shape].concat();
    train(&first, &args).unwrap();
    let trained = Sae::load(&first.join("layers.1"), &Device::Cpu).unwrap();
    let diff = |a: &Sae, b: &Sae| {
        flat(a)
            .iter()
            .zip(flat(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };

    let again = tmp.path().join("again");
    let finetune = |steps| {
        [
            "--hookpoints",
            both,
            "--finetune",
            s(&first),
            "--steps",
            steps,
        ]
    };
    train(&again, &finetune("1")).unwrap();
    let kept = Sae::load(&again.join("layers.1"), &Device::Cpu).unwrap();
    assert_eq!((kept.num_latents(), kept.k()), (48, 3));
    assert!(diff(&kept, &trained) < 1e-6, "{}", diff(&kept, &trained));
    // Without --hookpoints: the SAEs in the folder (not every cached point), the same run.
    let named_by_folder = tmp.path().join("named-by-folder");
    train(&named_by_folder, &["--finetune", s(&first), "--steps", "1"]).unwrap();
    for point in ["layers.1", "layers.1.mlp"] {
        let a = Sae::load(&named_by_folder.join(point), &Device::Cpu).unwrap();
        let b = Sae::load(&again.join(point), &Device::Cpu).unwrap();
        assert_eq!(flat(&a), flat(&b), "{point}");
    }
    assert!(!named_by_folder.join("layers.1.mlp.input").exists());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let message = format!(
        "{:#}",
        train(&named_by_folder, &["--finetune", s(&empty), "--steps", "1"]).unwrap_err()
    );
    assert!(message.contains("holds no SAE folders"), "{message}");
    let pinned = [
        "--finetune",
        s(&first),
        "--sae-revision",
        "v2",
        "--steps",
        "1",
    ];
    let message = format!("{:#}", train(&named_by_folder, &pinned).unwrap_err());
    assert!(
        message.contains("revision 'v2' applies to hub repositories"),
        "{message}"
    );
    // A fresh run's first step sets b_dec to the batch mean instead.
    let fresh = tmp.path().join("fresh");
    let args = [&["--hookpoints", both, "--steps", "1"][..], &shape].concat();
    train(&fresh, &args).unwrap();
    let reset = Sae::load(&fresh.join("layers.1"), &Device::Cpu).unwrap();
    let b_dec_moved = (reset.b_dec() - trained.b_dec()).unwrap().abs().unwrap();
    assert!(b_dec_moved.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3);
    // Steps after the first train it further.
    let more = tmp.path().join("more");
    train(&more, &finetune("3")).unwrap();
    let further = Sae::load(&more.join("layers.1"), &Device::Cpu).unwrap();
    assert!(diff(&further, &trained) > 1e-4);

    let elsewhere = s(&more.join("checkpoints")).to_string();
    let args = [
        "--hookpoints",
        both,
        "--finetune",
        &elsewhere,
        "--steps",
        "1",
    ];
    let message = format!("{:#}", train(&more, &args).unwrap_err());
    assert!(
        message.contains("--finetune") && message.contains("checkpoints/layers.1"),
        "{message}"
    );
    let args = [
        "--hookpoints",
        "layers.1.mlp",
        "--transcode",
        "--finetune",
        s(&first),
        "--steps",
        "1",
    ];
    let message = format!("{:#}", train(&more, &args).unwrap_err());
    assert!(
        message.contains("first/layers.1.mlp") && message.contains("not a transcoder"),
        "{message}"
    );
}

/// `sae train --exclude-tokens`: recorded in the checkpoint (a re-run excluding other
/// tokens is refused), and a cache's step count must then be given.
#[test]
fn exclude_tokens_is_recorded_and_needs_a_step_count_on_a_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = model_folder(tmp.path());
    let cache = cache_of_text(tmp.path(), &model_dir, "layers.1");
    let out = tmp.path().join("saes");
    let train = |extra: &[&str]| {
        let common = ["--batch-size", "256", "--num-latents", "48", "--k", "3"];
        train_on_cache(&cache, &out, &[&common[..], extra].concat()).map_err(|e| format!("{e:#}"))
    };
    let message = train(&["--exclude-tokens", "0,13"]).unwrap_err();
    assert!(
        message.contains("give --steps or --max-tokens"),
        "{message}"
    );
    train(&["--exclude-tokens", "0,13", "--steps", "2"]).unwrap();
    // --num-latents 0 is refused by name, not read as "use the expansion factor".
    let message = train_on_cache(&cache, &out, &["--num-latents", "0"])
        .map_err(|e| format!("{e:#}"))
        .unwrap_err();
    assert!(
        message.contains("'0' for '--num-latents <NUM_LATENTS>': must be at least 1"),
        "{message}"
    );
    // SAEs whose weights and optimizer state no machine holds are refused up front (this
    // ran until the kernel killed it); where Linux tells what memory is left.
    if hooks::memory::available_bytes().is_some() {
        let message = train_on_cache(
            &cache,
            &tmp.path().join("huge"),
            &["--batch-size", "256", "--expansion-factor", "1000000000000"],
        )
        .map_err(|e| format!("{e:#}"))
        .unwrap_err();
        assert!(
            message.contains("training SAEs of d_in [32] with these latents needs ")
                && message.ends_with(": lower --expansion-factor or --num-latents"),
            "{message}"
        );
    }
    assert_eq!(read_history(&out, "layers.1").len(), 2);
    let message = train(&["--exclude-tokens", "0", "--steps", "2"]).unwrap_err();
    assert!(message.contains("other training options"), "{message}");
}
