//! The calculation DAG at plant scale: 10,000 formulas over 100,000 tags.
//!
//! `incremental/*` is `Calc::update`: only the formulas a change reaches, in dependency
//! order. `naive/*` is the baseline the seed shipped: every formula evaluated on every tag
//! update (here in dependency order, which is kinder to it than the seed was).
//! Run: `cargo bench -p tagstream-core --bench calc`.

use std::{collections::BTreeMap, hint::black_box};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tagstream_core::{
    calc::{Calc, SignalId},
    point::{PointValue, Sample},
};
use tagstream_crds::FormulaSpec;

const DEVICES: usize = 1_000;
const TAGS_PER_DEVICE: usize = 100;
const FORMULAS: usize = 10_000;
const BATCH: usize = 125;

/// A small deterministic generator, so every run builds the same plant.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % n
    }
}

fn tag(index: usize) -> (String, String) {
    (
        format!("dev{}", index / TAGS_PER_DEVICE),
        format!("t{}", index % TAGS_PER_DEVICE),
    )
}

/// Each formula reads two tags and, for half of them, an earlier formula: chains as deep
/// as a real plant's and deeper.
type Tags = Vec<(String, String)>;
type Formulas = Vec<(String, FormulaSpec)>;

fn plant() -> (Tags, Formulas) {
    let tags: Vec<_> = (0..DEVICES * TAGS_PER_DEVICE).map(tag).collect();
    let mut rng = Lcg(42);
    let formulas = (0..FORMULAS)
        .map(|i| {
            let (d1, t1) = &tags[rng.below(tags.len())];
            let (d2, t2) = &tags[rng.below(tags.len())];
            let mut inputs = BTreeMap::from([
                ("a".to_owned(), format!("{d1}/{t1}")),
                ("b".to_owned(), format!("{d2}/{t2}")),
            ]);
            let mut expression = "(a - b) * 0.5 + max(a, b)".to_owned();
            if i > 0 && rng.below(2) == 0 {
                inputs.insert("c".to_owned(), format!("f{}", rng.below(i)));
                expression.push_str(" + c / 2");
            }
            let spec = FormulaSpec {
                site: "bench".into(),
                inputs,
                expression,
                unit: None,
                stale_after: None,
            };
            (format!("f{i}"), spec)
        })
        .collect();
    (tags, formulas)
}

fn primed(tags: &[(String, String)], formulas: &[(String, FormulaSpec)]) -> (Calc, Vec<SignalId>) {
    let mut calc = Calc::new();
    calc.configure(tags.iter().map(|(d, t)| (d.as_str(), t.as_str())), formulas);
    assert!(calc.issues().is_empty());
    let ids: Vec<SignalId> = tags.iter().map(|(d, t)| calc.tag_signal(d, t).unwrap()).collect();
    let initial = Sample::good(PointValue::Double(1.0), 0);
    calc.update(ids.iter().map(|&id| (id, &initial)), 0, &mut Vec::new());
    (calc, ids)
}

fn bench(c: &mut Criterion) {
    let (tags, formulas) = plant();
    let (mut calc, ids) = primed(&tags, &formulas);
    let mut out = Vec::with_capacity(FORMULAS);
    let mut step = 0i64;
    let sample = |step: i64| Sample::good(PointValue::Double(step as f64), step);

    c.bench_function("incremental/single-tag update", |b| {
        b.iter(|| {
            step += 1;
            let s = sample(step);
            out.clear();
            calc.update([(ids[(step as usize * 7919) % ids.len()], &s)], step, &mut out);
            black_box(out.len())
        });
    });
    c.bench_function("incremental/125-point batch (one device poll)", |b| {
        b.iter_batched_ref(
            || {
                step += 1;
                let device = (step as usize * 31) % DEVICES;
                let first = device * TAGS_PER_DEVICE;
                (first, sample(step), step)
            },
            |(first, s, at)| {
                out.clear();
                let batch = (0..BATCH).map(|k| (ids[(*first + k) % ids.len()], &*s));
                calc.update(batch, *at, &mut out);
                black_box(out.len())
            },
            BatchSize::SmallInput,
        );
    });

    let mut naive = c.benchmark_group("naive");
    naive.sample_size(10);
    naive.bench_function("single-tag update", |b| {
        b.iter(|| {
            out.clear();
            calc.evaluate_all(step, &mut out);
            black_box(out.len())
        });
    });
    naive.bench_function("125-point batch (one device poll)", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                out.clear();
                calc.evaluate_all(step, &mut out);
            }
            black_box(out.len())
        });
    });
    naive.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
