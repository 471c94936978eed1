//! The work edgegen does around the models, per picture: tokenizing the
//! prompt, one scheduler step on a 512×512 picture's latent, and turning the
//! decoded tensor into a PNG. `cargo bench --bench hot_paths`.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use edgegen::picture;
use edgegen::rng::TorchGenerator;
use edgegen::scheduler::{self, SchedulerConfig, SchedulerKind};
use edgegen::tokenizer::ClipTokenizer;

/// SD 1.x/2.x latent of a 512×512 picture.
const LATENT: [usize; 4] = [1, 4, 64, 64];
const STEPS: usize = 4;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer(c: &mut Criterion) {
    let tokenizer = ClipTokenizer::from_dir(&repo().join("models/tiny-random-sd/tokenizer"))
        .expect("bundled tokenizer");
    let prompts = [
        "a red apple on a tree",
        "two yellow suns above a purple house, next to a green car",
        "A photograph of an astronaut riding a horse on Mars, high detail, 8k, cinematic lighting",
    ];
    c.bench_function("tokenizer/encode 3 prompts", |b| {
        b.iter(|| {
            for prompt in prompts {
                std::hint::black_box(tokenizer.encode(prompt));
            }
        })
    });
}

fn scheduler_steps(c: &mut Criterion) {
    let config = SchedulerConfig::from_json("{}").expect("diffusers defaults");
    let mut rng = TorchGenerator::new(0);
    let sample = rng.randn(&LATENT);
    let model_output = rng.randn(&LATENT);
    let mut group = c.benchmark_group("scheduler step, latent 1x4x64x64");
    for kind in SchedulerKind::ALL {
        group.bench_function(kind.name(), |b| {
            b.iter_batched(
                || scheduler::build(kind, &config, STEPS).expect("scheduler"),
                |mut scheduler| {
                    let input = scheduler.scale_model_input(sample.clone(), 0);
                    std::hint::black_box(input);
                    scheduler.step(&model_output, 0, &sample, &mut rng)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn latents_to_png(c: &mut Criterion) {
    let decoded = TorchGenerator::new(1).randn(&[1, 3, 512, 512]);
    let parameters = "a red apple on a tree\nSteps: 4, Sampler: euler, Seed: 1, Size: 512x512";
    c.bench_function("picture/512x512 tensor to PNG", |b| {
        b.iter(|| {
            let pictures = picture::from_nchw(&decoded, [-1.0, 1.0]).expect("picture");
            pictures[0].to_png(Some(parameters)).expect("png")
        })
    });
}

criterion_group!(benches, tokenizer, scheduler_steps, latents_to_png);
criterion_main!(benches);
