//! Prediction trajectories against statistics computed directly from the logits, the figure
//! files (valid PNG / SVG of the size reported), and the across-checkpoint sweep over two
//! tiny local checkpoints (files produced, finished checkpoints skipped on a re-run).

use std::path::{Path, PathBuf};

use hooks::candle_core::{DType, Device, Tensor};
use hooks::{Hooks, LoadOptions, Model};
use lens::plot::{
    plot_checkpoint_heatmap, plot_layer_curves, plot_trajectories, plot_trajectory, TrajectoryView,
};
use lens::sweep::{
    checkpoint_grid, depth_grid, parse_checkpoints, plot_sweep, pythia_steps, run_sweep, SweepLens,
    SweepOptions,
};
use lens::train::TrainOptions;
use lens::trajectory::{PredictionTrajectory, Statistic};
use lens::{lens_input, LensData, TunedLens};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer() -> PathBuf {
    repo().join("data/gpt-neox-20b-tokenizer.json")
}

fn wikitext() -> PathBuf {
    repo().join("data/wikitext-2-raw-test.txt")
}

/// A tiny GPT-NeoX with synthetic weights and the real Pythia tokenizer in `dir`.
fn tiny_model(dir: &Path, layers: usize) -> Model {
    let config = hooks::synthetic::tiny_gpt_neox_config(layers);
    hooks::synthetic::write_synthetic_model(dir, &config, Some(&tokenizer())).unwrap();
    Model::from_folder(dir, &LoadOptions::default()).unwrap()
}

/// A tuned lens with non-zero translators (so it differs from the logit lens).
fn random_lens(model: &Model) -> TunedLens {
    let mut lens = TunedLens::for_model(model).unwrap();
    let params = lens
        .parameters()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let values = hooks::synthetic::synthetic_values(&format!("lens.{i}"), p.dims());
            (Tensor::from_vec(values, p.dims(), &Device::Cpu).unwrap() * 0.3).unwrap()
        })
        .collect();
    lens.set_parameters(params).unwrap();
    lens
}

/// Log-softmax of each row, in f64.
fn log_softmax_rows(logits: &Tensor) -> Vec<Vec<f64>> {
    let rows: Vec<Vec<f64>> = logits.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    rows.into_iter()
        .map(|row| {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = row.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
            row.iter().map(|x| x - log_sum).collect()
        })
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn statistics_equal_direct_computation_from_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 3);
    let ids = model
        .tokenizer()
        .unwrap()
        .encode("The tower is 324 metres tall, about the same height as")
        .unwrap();
    let t = ids.len();
    let tuned = random_lens(&model);
    // Direct: one forward with captures, lens logits by hand, statistics in f64 loops.
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let points: Vec<_> = (0..3).map(lens_input).collect();
    let out = model
        .forward(&input, &mut Hooks::new().capture(points.iter().copied()))
        .unwrap();
    let final_log_p = log_softmax_rows(&out.logits.unwrap().squeeze(0).unwrap());
    let unembedding = model.unembedding();
    for lens in [None, Some(&tuned)] {
        let trajectory = PredictionTrajectory::compute(&model, lens, &ids, 3).unwrap();
        assert_eq!(trajectory.layers, ["0", "1", "2", "output"]);
        assert_eq!(trajectory.tokens.len(), t);
        assert_eq!(trajectory.tokens[1], "␣tower");
        for (layer, point) in points
            .iter()
            .enumerate()
            .map(|(l, p)| (l, Some(p)))
            .chain([(3, None)])
        {
            let log_q = match point {
                None => final_log_p.clone(),
                Some(p) => {
                    let h = out.captures[p].squeeze(0).unwrap();
                    let h = match lens {
                        None => h,
                        Some(lens) => {
                            let (w, b) = lens.translator(layer);
                            (&h + h.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap())
                                .unwrap()
                        }
                    };
                    log_softmax_rows(&unembedding.forward(&h).unwrap())
                }
            };
            for pos in 0..t {
                let (q, p) = (&log_q[pos], &final_log_p[pos]);
                let entropy: f64 = -q.iter().map(|x| x.exp() * x).sum::<f64>();
                let kl: f64 = p.iter().zip(q).map(|(a, b)| a.exp() * (a - b)).sum();
                let best = (0..q.len()).max_by(|&a, &b| q[a].total_cmp(&q[b])).unwrap();
                let cell = &trajectory.cells[layer][pos];
                let what = format!("{} layer {layer} position {pos}", trajectory.lens);
                assert!(
                    close(cell.entropy, entropy, 1e-4),
                    "{what}: entropy {} vs {entropy}",
                    cell.entropy
                );
                assert!(
                    close(cell.forward_kl, kl, 1e-3) || (cell.forward_kl - kl).abs() < 1e-4,
                    "{what}: kl {} vs {kl}",
                    cell.forward_kl
                );
                assert_eq!(cell.top_ids[0], best as u32, "{what}");
                assert!(close(cell.max_probability, q[best].exp(), 1e-4), "{what}");
                assert!(cell.top_probs.windows(2).all(|w| w[0] >= w[1]), "{what}");
                if pos + 1 < t {
                    let target = ids[pos + 1] as usize;
                    // f32 vs f64 rounding may reorder near-ties: bound the rank.
                    let above = |margin: f64| {
                        1 + q.iter().filter(|&&x| x > q[target] + margin).count() as u64
                    };
                    let rank = cell.target_rank.unwrap();
                    assert!(
                        above(1e-5) <= rank && rank <= above(-1e-5),
                        "{what}: rank {rank}"
                    );
                    assert!(
                        above(-1e-5) - above(1e-5) <= 20,
                        "{what}: the bound is too loose to test"
                    );
                    assert!(
                        close(cell.cross_entropy.unwrap(), -q[target], 1e-4),
                        "{what}"
                    );
                } else {
                    assert_eq!(
                        (cell.target_rank, cell.cross_entropy),
                        (None, None),
                        "{what}"
                    );
                }
            }
        }
        // The output row is the model itself: no KL to itself.
        assert!(trajectory.cells[3]
            .iter()
            .all(|c| c.forward_kl.abs() < 1e-5));
    }
    // Difference of two lenses, cell by cell; exports round-trip.
    let logit = PredictionTrajectory::compute(&model, None, &ids, 3).unwrap();
    let tuned_t = PredictionTrajectory::compute(&model, Some(&tuned), &ids, 3).unwrap();
    let diff = tuned_t.difference(&logit, Statistic::Entropy).unwrap();
    assert!(
        (diff[1][2].unwrap() - (tuned_t.cells[1][2].entropy - logit.cells[1][2].entropy)).abs()
            < 1e-12
    );
    assert_eq!(diff[3][0], Some(0.0));
    let out_dir = tempfile::tempdir().unwrap();
    let json = out_dir.path().join("t.json");
    tuned_t.write_json(&json).unwrap();
    assert_eq!(PredictionTrajectory::read_json(&json).unwrap(), tuned_t);
    // Files whose tables disagree in size are refused on reading, not later by a panic.
    let mut short_row = tuned_t.clone();
    short_row.cells[1].pop();
    let mut no_tops = tuned_t.clone();
    no_tops.cells[0][1].top_ids.clear();
    let mut no_tokens = tuned_t.clone();
    no_tokens.tokens.clear();
    for (broken, says) in [
        (short_row, "row 1 has"),
        (no_tops, "at position 1 has no top tokens"),
        (no_tokens, "input ids and 0 tokens"),
    ] {
        broken.write_json(&json).unwrap();
        let err = PredictionTrajectory::read_json(&json)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a prediction trajectory") && err.contains(says),
            "{err}"
        );
    }
    let csv = tuned_t.to_csv();
    assert_eq!(csv.lines().count(), 1 + 4 * t);
    assert!(
        csv.lines()
            .nth(1)
            .unwrap()
            .starts_with("0,0,\"The\",\"␣tower\","),
        "{csv}"
    );
    let other = PredictionTrajectory::compute(&model, None, &ids[..3], 3).unwrap();
    assert!(logit.difference(&other, Statistic::Entropy).is_err());
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

/// Width and height attributes of an SVG's root element.
fn svg_size(path: &Path) -> (u32, u32) {
    let text = std::fs::read_to_string(path).unwrap();
    let start = text
        .find("<svg")
        .unwrap_or_else(|| panic!("{} is not an SVG", path.display()));
    let tag = &text[start..start + text[start..].find('>').unwrap()];
    let attr = |name: &str| -> u32 {
        let at = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        tag[at..at + tag[at..].find('"').unwrap()].parse().unwrap()
    };
    assert!(text.trim_end().ends_with("</svg>"));
    (attr("width"), attr("height"))
}

#[test]
fn figures_are_valid_png_and_svg_of_the_reported_size() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), 2);
    let ids = model
        .tokenizer()
        .unwrap()
        .encode("In 1998 the band released")
        .unwrap();
    let logit = PredictionTrajectory::compute(&model, None, &ids, 2).unwrap();
    let tuned = PredictionTrajectory::compute(&model, Some(&random_lens(&model)), &ids, 2).unwrap();
    let out = dir.path().join("figures");
    for ext in ["png", "svg"] {
        let size_of = |p: &Path| {
            if ext == "png" {
                png_size(p)
            } else {
                svg_size(p)
            }
        };
        for statistic in Statistic::ALL {
            let path = out.join(format!("t-{}.{ext}", statistic.key()));
            let size = plot_trajectory(&path, TrajectoryView::Single(&tuned), statistic).unwrap();
            assert_eq!(size_of(&path), size);
            assert!(
                size.0 >= 92 * ids.len() as u32 && size.1 >= 3 * 30,
                "{size:?}"
            );
        }
        let path = out.join(format!("diff.{ext}"));
        let size = plot_trajectory(
            &path,
            TrajectoryView::Difference(&tuned, &logit),
            Statistic::ForwardKl,
        )
        .unwrap();
        assert_eq!(size_of(&path), size);
        let path = out.join(format!("side.{ext}"));
        let panels = vec![
            ("a".to_string(), logit.clone()),
            ("b".to_string(), tuned.clone()),
        ];
        let single = plot_trajectory(
            &out.join(format!("one.{ext}")),
            TrajectoryView::Single(&logit),
            Statistic::Rank,
        )
        .unwrap();
        let size = plot_trajectories(&path, "two panels", &panels, Statistic::Rank).unwrap();
        assert_eq!(size_of(&path), size);
        assert!(
            size.0 > single.0 + 500,
            "two panels {size:?} vs one {single:?}"
        );
    }
    // No stray temporary files, and unknown formats are refused by name.
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
    let err = plot_trajectory(
        &out.join("t.jpg"),
        TrajectoryView::Single(&logit),
        Statistic::Entropy,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("t.jpg") && err.contains(".png or .svg"),
        "{err}"
    );
    let short = PredictionTrajectory::compute(&model, None, &ids[..2], 2).unwrap();
    let err = plot_trajectories(
        &out.join("x.png"),
        "t",
        &[("a".into(), logit), ("b".into(), short)],
        Statistic::Entropy,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("'b'"), "{err}");
}

#[test]
fn checkpoint_lists() {
    let steps = pythia_steps(None);
    assert_eq!(steps.len(), 154);
    assert_eq!(
        &steps[..12],
        &[0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    );
    assert_eq!(*steps.last().unwrap(), 143_000);
    assert_eq!(
        parse_checkpoints("pythia:256-2000").unwrap(),
        ["step256", "step512", "step1000", "step2000"]
    );
    assert_eq!(
        parse_checkpoints("step1000, step8000,main").unwrap(),
        ["step1000", "step8000", "main"]
    );
    for bad in ["pythia:9-1", "pythia:x", "a,a", " , "] {
        assert!(parse_checkpoints(bad).is_err(), "{bad}");
    }
}

fn sweep_options(series: &Path, output: &Path) -> SweepOptions {
    let data = LensData {
        data: vec![wikitext()],
        activations: None,
        format: None,
        text_field: "text".into(),
        seq_len: 32,
        batch_size: 2,
        shuffle_sequences: hooks::data::SHUFFLED_SEQUENCES,
    };
    SweepOptions {
        model: series.display().to_string(),
        checkpoints: vec!["step0".into(), "step1".into()],
        load: LoadOptions::default(),
        tokenizer: None,
        output: output.to_path_buf(),
        lens: SweepLens::Train {
            data: data.clone(),
            options: TrainOptions {
                steps: 2,
                tokens_per_step: 64,
                seq_len: 32,
                chunk_tokens: 64,
                ..TrainOptions::default()
            },
        },
        eval_data: data,
        eval_tokens: 128,
        chunk_tokens: 64,
        prompt: Some("The river flows into the".into()),
        top_k: 3,
    }
}

/// Replaces one weight of the model in `folder` by `edit` of it.
fn edit_weight(folder: &Path, name: &str, edit: impl FnOnce(&Tensor) -> Tensor) {
    let weights = folder.join("model.safetensors");
    let mut tensors = hooks::candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let edited = edit(&tensors[name]);
    tensors.insert(name.into(), edited);
    hooks::candle_core::safetensors::save(&tensors, &weights).unwrap();
}

#[test]
fn sweep_over_two_local_checkpoints_writes_files_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let series = dir.path().join("series");
    tiny_model(&series.join("step0"), 2);
    // A second checkpoint with other weights: one layer's MLP output bias shifted.
    tiny_model(&series.join("step1"), 2);
    edit_weight(
        &series.join("step1"),
        "gpt_neox.layers.1.mlp.dense_4h_to_h.bias",
        |b| (b + 0.5).unwrap(),
    );

    let output = dir.path().join("sweep");
    let options = sweep_options(&series, &output);
    let summary = run_sweep(&options, false).unwrap();
    assert_eq!(summary.results.len(), 2);
    assert_eq!(summary.name, "series");
    for rev in ["step0", "step1"] {
        let folder = output.join(rev);
        for file in [
            "result.json",
            "eval.json",
            "trajectory-logit.json",
            "trajectory-tuned.json",
            "lens/params.safetensors",
            "lens/config.json",
        ] {
            assert!(folder.join(file).is_file(), "{rev}/{file} missing");
        }
        let t = PredictionTrajectory::read_json(&folder.join("trajectory-tuned.json")).unwrap();
        assert_eq!(
            (t.revision.as_deref(), t.lens.as_str()),
            (Some(rev), "tuned lens")
        );
    }
    let r = &summary.results;
    assert_eq!(r[0].eval.tokens, 128);
    assert_ne!(
        r[0].eval.logit_lens[2].ce, r[1].eval.logit_lens[2].ce,
        "the checkpoints differ"
    );
    assert_eq!(
        r[0].eval.logit_lens[0].ce, r[1].eval.logit_lens[0].ce,
        "layer 0 (embedding) is the same"
    );
    let grid = checkpoint_grid(&summary, Statistic::ForwardKl, true).unwrap();
    assert_eq!((grid.layers.len(), grid.checkpoints.len()), (3, 2));
    assert_eq!(
        grid.values[1][1],
        Some(r[1].eval.tuned_lens.as_ref().unwrap()[1].kl)
    );
    assert!(checkpoint_grid(&summary, Statistic::Rank, false).is_err());
    let depths = depth_grid(&summary, true).unwrap();
    assert_eq!((depths.layers.len(), depths.checkpoints.len()), (3, 2));
    let tuned_depth = r[1].eval.tuned_lens_depth.as_ref().unwrap();
    assert_eq!(tuned_depth.counts.iter().sum::<u64>(), 128);
    assert_eq!(
        depths.values[2][1],
        Some(tuned_depth.counts[2] as f64 / 128.0)
    );
    assert!(depths.checkpoints[1].starts_with("step1 (mean "));

    let figures = output.join("figures");
    let written = plot_sweep(
        &output,
        &figures,
        &[Statistic::CrossEntropy, Statistic::ForwardKl],
        6,
    )
    .unwrap();
    // ((heatmap + curves + trajectories) x 2 statistics + prediction depths) x (logit,
    // tuned) x (png, svg)
    assert_eq!(written.len(), 28);
    for path in &written {
        let size = if path.extension().unwrap() == "png" {
            png_size(path)
        } else {
            svg_size(path)
        };
        assert!(
            size.0 >= 600 && size.1 >= 400,
            "{}: {size:?}",
            path.display()
        );
    }
    let heat =
        plot_checkpoint_heatmap(&dir.path().join("h.png"), &grid, Statistic::ForwardKl).unwrap();
    assert_eq!(png_size(&dir.path().join("h.png")), heat);
    let curves = plot_layer_curves(&dir.path().join("c.svg"), &grid).unwrap();
    assert_eq!(svg_size(&dir.path().join("c.svg")), curves);

    // Resume: step0 is done, so it is not loaded again (its folder is gone now, as a user
    // short of disk may delete what is done); step1's result is removed, so step1 is
    // evaluated again (its lens is reused, not retrained).
    let step0_folder = series.join("step0");
    let step0_backup = dir.path().join("step0-backup");
    std::fs::rename(&step0_folder, &step0_backup).unwrap();
    let step0_result = std::fs::read(output.join("step0/result.json")).unwrap();
    std::fs::remove_file(output.join("step1/result.json")).unwrap();
    let lens_file = output.join("step1/lens/params.safetensors");
    let lens_time = std::fs::metadata(&lens_file).unwrap().modified().unwrap();
    let again = run_sweep(&options, false).unwrap();
    assert_eq!(
        std::fs::read(output.join("step0/result.json")).unwrap(),
        step0_result
    );
    assert_eq!(
        std::fs::metadata(&lens_file).unwrap().modified().unwrap(),
        lens_time
    );
    assert_eq!(
        again.results[1].eval.tuned_lens,
        summary.results[1].eval.tuned_lens
    );
    std::fs::rename(&step0_backup, &step0_folder).unwrap();
    // Without results, the lenses are checked against the recipe through their training
    // checkpoints: another number of steps is refused, another chunk size is not another
    // lens.
    for step in ["step0", "step1"] {
        std::fs::remove_file(output.join(step).join("result.json")).unwrap();
    }
    let with_train = |steps, chunk_tokens| {
        let SweepLens::Train {
            data,
            options: train,
        } = &options.lens
        else {
            unreachable!()
        };
        SweepOptions {
            lens: SweepLens::Train {
                data: data.clone(),
                options: TrainOptions {
                    steps,
                    chunk_tokens,
                    ..train.clone()
                },
            },
            ..options.clone()
        }
    };
    let err = run_sweep(&with_train(3, 64), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("step0/lens/training/checkpoint.safetensors: was made with other training options (steps: 2 -> 3)"),
        "{err}"
    );
    // ... and against their training data.
    let other_text = dir.path().join("other.txt");
    let text = std::fs::read_to_string(repo().join("data/wikitext-2-raw-test.txt")).unwrap();
    std::fs::write(&other_text, &text[text.len() / 2..]).unwrap();
    let mut other_data = with_train(2, 64);
    if let SweepLens::Train { data, .. } = &mut other_data.lens {
        data.data = vec![other_text];
    }
    let err = run_sweep(&other_data, false).unwrap_err().to_string();
    assert!(
        err.contains("step0/lens/training/checkpoint.safetensors: was made from other data")
            && err.ends_with("step0/lens to train it again)"),
        "{err}"
    );
    let rechunked = run_sweep(&with_train(2, 32), false).unwrap();
    assert_eq!(
        rechunked.results[1].eval.tuned_lens,
        summary.results[1].eval.tuned_lens
    );
    assert_eq!(
        std::fs::metadata(&lens_file).unwrap().modified().unwrap(),
        lens_time
    );
    // Two revisions that would share a folder are refused before anything runs.
    let colliding = SweepOptions {
        checkpoints: vec!["refs/pr/1".into(), "refs_pr_1".into()],
        ..options.clone()
    };
    let err = run_sweep(&colliding, false).unwrap_err().to_string();
    assert!(
        err.contains("checkpoints 'refs/pr/1' and 'refs_pr_1' would share the folder"),
        "{err}"
    );
    // A finished checkpoint is not reused for a sweep with other settings.
    let other = SweepOptions {
        eval_tokens: 64,
        ..options.clone()
    };
    let err = run_sweep(&other, false).unwrap_err().to_string();
    assert!(
        err.contains("made with other settings (eval_tokens: 128 -> 64)"),
        "{err}"
    );
    // A result of another revision is not taken for this one's.
    let step1_result = output.join("step1/result.json");
    let step1_bytes = std::fs::read(&step1_result).unwrap();
    std::fs::copy(output.join("step0/result.json"), &step1_result).unwrap();
    let err = run_sweep(&options, false).unwrap_err().to_string();
    assert!(
        err.contains("step1/result.json holds the results of checkpoint 'step0', not 'step1'"),
        "{err}"
    );
    std::fs::write(&step1_result, step1_bytes).unwrap();
    // A damaged result says how to redo its checkpoint.
    let result_file = output.join("step0/result.json");
    let result_bytes = std::fs::read(&result_file).unwrap();
    std::fs::write(&result_file, &result_bytes[..result_bytes.len() / 2]).unwrap();
    let err = run_sweep(&options, false).unwrap_err().to_string();
    assert!(
        err.contains("step0/result.json: EOF while parsing")
            && err.ends_with(&format!(
                "delete {} to compute that checkpoint again",
                output.join("step0").display()
            )),
        "{err}"
    );
    std::fs::write(&result_file, &result_bytes).unwrap();
    // A checkpoint missing from a folder of checkpoint folders is not the folder itself,
    // and it is named before any checkpoint runs, wherever it is in the list.
    let missing_output = dir.path().join("sweep-missing");
    let missing = SweepOptions {
        checkpoints: vec!["step0".into(), "step7".into(), "step9".into()],
        output: missing_output.clone(),
        ..options.clone()
    };
    let err = run_sweep(&missing, false).unwrap_err().to_string();
    assert!(
        err.contains("nor a folder holding every checkpoint: missing ")
            && err.contains("step7, ")
            && err.ends_with("step9 (each needs a config.json)"),
        "{err}"
    );
    assert!(!missing_output.exists(), "nothing ran");
    // Without the resume, the missing weights of step0 are an error naming the folder.
    std::fs::remove_file(step0_folder.join("model.safetensors")).unwrap();
    std::fs::remove_file(output.join("step0/result.json")).unwrap();
    let err = run_sweep(&options, false).unwrap_err().to_string();
    assert!(err.contains("step0"), "{err}");
}

/// A model whose outputs are NaN (a NaN final-norm weight) is an evaluation error, not a
/// report of perfect top-1 agreement; so are next tokens outside the unembedding's vocabulary.
#[test]
fn evaluating_a_model_with_non_finite_outputs_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = hooks::synthetic::tiny_gpt_neox_config(2);
    hooks::synthetic::write_synthetic_model(dir.path(), &config, Some(&tokenizer())).unwrap();
    edit_weight(dir.path(), "gpt_neox.final_layer_norm.weight", |w| {
        Tensor::full(f32::NAN, w.shape(), &Device::Cpu).unwrap()
    });
    let model = Model::from_folder(dir.path(), &LoadOptions::default()).unwrap();
    let data = LensData {
        data: vec![repo().join("data/wikitext-2-raw-test.txt")],
        activations: None,
        format: None,
        text_field: "text".into(),
        seq_len: 32,
        batch_size: 2,
        shuffle_sequences: hooks::data::SHUFFLED_SEQUENCES,
    };
    let mut source = data
        .open(&model, hooks::activations::ReadOrder::Sequential, Some(64))
        .unwrap();
    let evaluate = |source: &mut dyn hooks::activations::ActivationSource, chunk_tokens| {
        lens::eval::evaluate(None, &model.unembedding(), 2, source, 32, 64, chunk_tokens)
            .unwrap_err()
            .to_string()
    };
    let err = evaluate(source.as_mut(), 0);
    assert!(
        err.contains("(--chunk-tokens) must be positive and the sequence length at least 2"),
        "{err}"
    );
    let err = evaluate(source.as_mut(), 64);
    assert!(err.contains("outputs are not finite"), "{err}");
    // An unembedding narrower than the data's token ids is an error naming the first one.
    let full = model.unembedding();
    let narrow = hooks::Unembedding::new(full.norm.clone(), full.weight.narrow(0, 0, 100).unwrap());
    let mut source = data
        .open(&model, hooks::activations::ReadOrder::Sequential, Some(64))
        .unwrap();
    let err = lens::eval::evaluate(None, &narrow, 2, source.as_mut(), 32, 64, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("token id ") && err.ends_with("is outside the model's vocabulary of 100"),
        "{err}"
    );
}
