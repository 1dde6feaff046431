//! The calculation DAG: each error kind, run-time qualities, incremental evaluation, the
//! example plant's chain, reconfiguration, and a property test against full evaluation.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tagstream_core::{
    calc::{Calc, Derived, FormulaError},
    point::{PointValue, QualityLevel, Sample},
};
use tagstream_crds::FormulaSpec;

fn spec(inputs: &[(&str, &str)], expression: &str) -> FormulaSpec {
    FormulaSpec {
        site: "plant-a".into(),
        inputs: inputs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        expression: expression.into(),
        unit: None,
        stale_after: None,
    }
}

fn formula(name: &str, inputs: &[(&str, &str)], expression: &str) -> (String, FormulaSpec) {
    (name.to_owned(), spec(inputs, expression))
}

const TAGS: [(&str, &str); 4] = [
    ("boiler", "t_in"),
    ("boiler", "t_out"),
    ("boiler", "flow"),
    ("line", "code"),
];

fn calc(formulas: &[(String, FormulaSpec)]) -> Calc {
    let mut calc = Calc::new();
    calc.configure(TAGS, formulas);
    calc
}

fn issue(formulas: &[(String, FormulaSpec)], name: &str) -> FormulaError {
    calc(formulas)
        .issues()
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} has no issue"))
}

fn set(calc: &mut Calc, at: i64, values: &[((&str, &str), Sample)]) -> Vec<Derived> {
    let changes: Vec<_> = values
        .iter()
        .map(|((device, tag), sample)| (calc.tag_signal(device, tag).unwrap(), sample))
        .collect();
    let mut out = Vec::new();
    calc.update(changes, at, &mut out);
    out
}

fn by_name(calc: &Calc, derived: &[Derived]) -> BTreeMap<String, Sample> {
    derived
        .iter()
        .map(|d| (calc.formula(d.formula).name.clone(), d.sample.clone()))
        .collect()
}

fn num(v: f64, at: i64) -> Sample {
    Sample::good(PointValue::Double(v), at)
}

#[test]
fn every_compile_error_names_what_is_wrong() {
    let cases = [
        (
            formula("f", &[("a", "boiler/t_in")], "a +* 2"),
            "expression does not parse",
        ),
        (
            formula("f", &[("a", "boiler/t_in")], "a + b"),
            "identifier \"b\" is not one of the formula's inputs",
        ),
        (
            formula("f", &[("a", "boiler/t_in"), ("b", "boiler/t_out")], "a * 2"),
            "input \"b\" is not used",
        ),
        (formula("f", &[("a", "boiler/t_in")], "a = 3; a"), "assigns to \"a\""),
        (formula("f", &[("a", "boiler/t_in")], "a += 1"), "assigns to \"a\""),
        (
            formula("f", &[("a", "boiler/t_in")], "median(a)"),
            "function \"median\" does not exist",
        ),
        (
            formula("f", &[("a", "boiler/t_in")], "a * random()"),
            "function \"random\" gives a different result",
        ),
        (
            formula("f", &[("a", "boiler/pressure")], "a"),
            "input \"a\" reads boiler/pressure, which does not exist",
        ),
        (
            formula("f", &[("a", "ghost")], "a"),
            "input \"a\" reads ghost, which does not exist",
        ),
    ];
    for ((name, spec), expected) in cases {
        let error = issue(&[(name.clone(), spec.clone())], &name);
        assert!(error.to_string().contains(expected), "{}: {error}", spec.expression);
    }
}

#[test]
fn cycles_name_every_member_and_poison_their_dependents() {
    let formulas = [
        formula("a", &[("x", "c"), ("t", "boiler/t_in")], "x + t"),
        formula("b", &[("x", "a")], "x * 2"),
        formula("c", &[("x", "b")], "x - 1"),
        formula("self-loop", &[("x", "self-loop")], "x"),
        formula("downstream", &[("x", "b")], "x"),
        formula("fine", &[("t", "boiler/t_in")], "t"),
    ];
    let calc = calc(&formulas);
    let cycle = FormulaError::Cycle {
        members: vec!["a".into(), "b".into(), "c".into()],
    };
    assert_eq!(calc.issues()["a"], cycle);
    assert_eq!(calc.issues()["c"], cycle);
    assert_eq!(
        calc.issues()["b"].to_string(),
        "on a dependency cycle of the formulas a, b, c"
    );
    assert_eq!(
        calc.issues()["self-loop"],
        FormulaError::Cycle {
            members: vec!["self-loop".into()]
        }
    );
    assert_eq!(
        calc.issues()["downstream"],
        FormulaError::InvalidInput {
            variable: "x".into(),
            formula: "b".into()
        }
    );
    let running: Vec<&str> = calc.order().map(|f| f.name.as_str()).collect();
    assert_eq!(running, ["fine"]);
}

#[test]
fn a_chain_is_evaluated_in_dependency_order_once_per_batch() {
    let formulas = [
        formula("efficiency", &[("heat", "heat")], "heat / 100"),
        formula(
            "heat",
            &[("dt", "delta-t"), ("flow", "boiler/flow")],
            "dt * flow * 1.163",
        ),
        formula("delta-t", &[("a", "boiler/t_in"), ("b", "boiler/t_out")], "b - a"),
    ];
    let mut calc = calc(&formulas);
    let order: Vec<&str> = calc.order().map(|f| f.name.as_str()).collect();
    assert_eq!(order, ["delta-t", "heat", "efficiency"]);

    // Until every input has a value there is nothing to compute.
    assert!(set(&mut calc, 1, &[(("boiler", "t_in"), num(60.0, 1))]).is_empty());
    let out = set(
        &mut calc,
        2,
        &[(("boiler", "t_out"), num(80.0, 2)), (("boiler", "flow"), num(4.0, 2))],
    );
    let names: Vec<&str> = out.iter().map(|d| calc.formula(d.formula).name.as_str()).collect();
    assert_eq!(names, ["delta-t", "heat", "efficiency"], "each once, inputs first");
    let values = by_name(&calc, &out);
    assert_eq!(values["heat"].value, Some(PointValue::Double(20.0 * 4.0 * 1.163)));
    assert_eq!(values["heat"].timestamp_ns, 2, "newest input time");

    // A change reaching only part of the graph evaluates only that part.
    let out = set(&mut calc, 3, &[(("boiler", "flow"), num(5.0, 3))]);
    let names: Vec<&str> = out.iter().map(|d| calc.formula(d.formula).name.as_str()).collect();
    assert_eq!(names, ["heat", "efficiency"]);
    // Another tag with no dependents evaluates nothing.
    assert!(
        set(
            &mut calc,
            4,
            &[(("line", "code"), Sample::good(PointValue::String("A1".into()), 4))]
        )
        .is_empty()
    );
}

#[test]
fn run_time_problems_become_point_quality() {
    let formulas = [
        formula("text-math", &[("c", "line/code")], "c * 2"),
        formula("int-div", &[("a", "boiler/t_in")], "7 / (a - a)"),
        formula("float-div", &[("a", "boiler/t_out")], "1.0 / (a - a)"),
        formula("sum", &[("a", "boiler/t_in"), ("b", "boiler/flow")], "a + b"),
    ];
    let mut calc = calc(&formulas);
    let out = set(
        &mut calc,
        10,
        &[
            (("line", "code"), Sample::good(PointValue::String("A1".into()), 10)),
            (("boiler", "t_in"), Sample::good(PointValue::Int(3), 10)),
            (("boiler", "t_out"), num(2.0, 10)),
            (("boiler", "flow"), Sample::bad("timeout", 9)),
        ],
    );
    let values = by_name(&calc, &out);
    for name in ["text-math", "int-div", "float-div"] {
        assert_eq!(values[name].quality.level, QualityLevel::Bad, "{name}");
        assert_eq!(values[name].value, None, "{name}");
    }
    assert!(
        values["int-div"]
            .quality
            .reason
            .as_deref()
            .unwrap()
            .contains("evaluation failed")
    );
    assert!(
        values["float-div"]
            .quality
            .reason
            .as_deref()
            .unwrap()
            .contains("division by zero")
    );
    assert_eq!(values["sum"].quality.reason.as_deref(), Some("input b is bad"));
}

#[test]
fn stale_and_uncertain_inputs_make_an_uncertain_result() {
    let mut stale = spec(&[("a", "boiler/t_in"), ("b", "boiler/t_out")], "a + b");
    stale.stale_after = Some(tagstream_crds::Duration::from_secs(10));
    let mut calc = calc(&[("sum".into(), stale)]);
    let second = 1_000_000_000;
    set(&mut calc, 0, &[(("boiler", "t_in"), num(1.0, 0))]);
    let out = set(&mut calc, 5 * second, &[(("boiler", "t_out"), num(2.0, 5 * second))]);
    assert!(out[0].sample.quality.is_good());
    let out = set(&mut calc, 20 * second, &[(("boiler", "t_out"), num(3.0, 20 * second))]);
    assert_eq!(out[0].sample.quality.level, QualityLevel::Uncertain);
    assert_eq!(out[0].sample.quality.reason.as_deref(), Some("input a is stale"));
    assert_eq!(
        out[0].sample.value,
        Some(PointValue::Double(4.0)),
        "an uncertain result keeps its value"
    );

    let mut uncertain = num(5.0, 21 * second);
    uncertain.quality = tagstream_core::point::Quality::uncertain("sensor warming up");
    let out = set(&mut calc, 21 * second, &[(("boiler", "t_in"), uncertain)]);
    assert_eq!(out[0].sample.quality.level, QualityLevel::Uncertain);
    assert_eq!(out[0].sample.quality.reason.as_deref(), Some("input a is uncertain"));
}

#[test]
fn reconfiguring_compiles_only_what_changed_and_keeps_the_rest_running() {
    let mut formulas = vec![
        formula("delta-t", &[("a", "boiler/t_in"), ("b", "boiler/t_out")], "b - a"),
        formula("heat", &[("dt", "delta-t"), ("flow", "boiler/flow")], "dt * flow"),
        formula("doubled-flow", &[("f", "boiler/flow")], "f * 2"),
    ];
    let mut calc = Calc::new();
    let first = calc.configure(TAGS, &formulas);
    assert_eq!((first.compiled, first.reused, first.removed), (3, 0, 0));
    let flow = calc.tag_signal("boiler", "flow").unwrap();
    set(
        &mut calc,
        1,
        &[
            (("boiler", "t_in"), num(10.0, 1)),
            (("boiler", "t_out"), num(30.0, 1)),
            (("boiler", "flow"), num(2.0, 1)),
        ],
    );

    // Change delta-t, break doubled-flow, add nothing: two compiles, one reuse.
    formulas[0] = formula(
        "delta-t",
        &[("a", "boiler/t_in"), ("b", "boiler/t_out")],
        "(b - a) * 10",
    );
    formulas[2] = formula("doubled-flow", &[("f", "boiler/flow")], "f *");
    let second = calc.configure(TAGS, &formulas);
    assert_eq!((second.compiled, second.reused, second.removed), (2, 1, 0));
    assert_eq!(
        calc.tag_signal("boiler", "flow"),
        Some(flow),
        "signal ids survive reconfiguration"
    );
    assert!(matches!(calc.issues()["doubled-flow"], FormulaError::Parse { .. }));

    // The next update, even an empty one, re-evaluates the changed formula and its
    // dependents from the values already held: nothing has to be polled again.
    let mut out = Vec::new();
    calc.update([], 2, &mut out);
    let values = by_name(&calc, &out);
    assert_eq!(values.keys().collect::<Vec<_>>(), ["delta-t", "heat"]);
    assert_eq!(values["heat"].value, Some(PointValue::Double(400.0)));

    formulas.remove(2);
    let third = calc.configure(TAGS, &formulas);
    assert_eq!((third.compiled, third.reused, third.removed), (0, 2, 1));
    assert!(calc.issues().is_empty());
}

/// A random DAG: formula `i` adds up a few tags and formulas with smaller indices.
/// Tag count, each formula's inputs (tag index, or tag count + formula index), and batches
/// of (tag, value) updates.
type RandomSite = (usize, Vec<Vec<usize>>, Vec<Vec<(usize, i32)>>);
type Tags = Vec<(String, String)>;
type Formulas = Vec<(String, FormulaSpec)>;

fn random_site() -> impl Strategy<Value = RandomSite> {
    (2usize..12, 1usize..25).prop_flat_map(|(tags, formulas)| {
        let inputs: Vec<_> = (0..formulas)
            .map(|i| prop::collection::btree_set(0..tags + i, 1..4))
            .collect();
        let batches = prop::collection::vec(prop::collection::vec((0..tags, -50i32..50), 1..5), 1..12);
        (
            Just(tags),
            inputs.prop_map(|sets| sets.into_iter().map(|s| s.into_iter().collect()).collect()),
            batches,
        )
    })
}

fn build_site(tags: usize, inputs: &[Vec<usize>]) -> (Tags, Formulas) {
    let tag_names: Vec<(String, String)> = (0..tags).map(|t| (format!("dev{}", t % 3), format!("t{t}"))).collect();
    let formulas = inputs
        .iter()
        .enumerate()
        .map(|(i, sources)| {
            let inputs: BTreeMap<String, String> = sources
                .iter()
                .enumerate()
                .map(|(k, &s)| {
                    let reference = if s < tags {
                        format!("{}/{}", tag_names[s].0, tag_names[s].1)
                    } else {
                        format!("f{}", s - tags)
                    };
                    (format!("v{k}"), reference)
                })
                .collect();
            let expression = (0..sources.len())
                .map(|k| format!("v{k} * {}", k + 1))
                .collect::<Vec<_>>()
                .join(" + ");
            let spec = FormulaSpec {
                site: "s".into(),
                inputs,
                expression,
                unit: None,
                stale_after: None,
            };
            (format!("f{i}"), spec)
        })
        .collect();
    (tag_names, formulas)
}

proptest! {
    #[test]
    fn incremental_evaluation_matches_evaluating_everything((tags, inputs, batches) in random_site()) {
        let (tag_names, formulas) = build_site(tags, &inputs);
        let tag_refs: Vec<(&str, &str)> = tag_names.iter().map(|(d, t)| (d.as_str(), t.as_str())).collect();
        let mut incremental = Calc::new();
        incremental.configure(tag_refs.iter().copied(), &formulas);
        prop_assert!(incremental.issues().is_empty());

        let mut latest_tags: BTreeMap<usize, Sample> = BTreeMap::new();
        let mut seen: BTreeMap<String, Sample> = BTreeMap::new();
        for (step, batch) in batches.iter().enumerate() {
            let at = step as i64;
            let samples: Vec<(usize, Sample)> = batch.iter().map(|&(t, v)| (t, Sample::good(PointValue::Double(f64::from(v)), at))).collect();
            let changes: Vec<_> = samples.iter().map(|(t, s)| (incremental.tag_signal(&tag_names[*t].0, &tag_names[*t].1).unwrap(), s)).collect();
            let mut out = Vec::new();
            incremental.update(changes, at, &mut out);

            let mut evaluated: Vec<_> = out.iter().map(|d| d.formula).collect();
            evaluated.sort();
            let before = evaluated.len();
            evaluated.dedup();
            prop_assert_eq!(before, evaluated.len(), "a formula was evaluated twice in one batch");

            seen.extend(by_name(&incremental, &out));
            latest_tags.extend(samples);

            // The reference: a fresh DAG given every current tag value, evaluating all.
            let mut reference = Calc::new();
            reference.configure(tag_refs.iter().copied(), &formulas);
            let all: Vec<_> = latest_tags.iter().map(|(t, s)| (reference.tag_signal(&tag_names[*t].0, &tag_names[*t].1).unwrap(), s)).collect();
            let mut expected = Vec::new();
            reference.update(all, at, &mut Vec::new());
            reference.evaluate_all(at, &mut expected);
            let expected: BTreeMap<String, Option<PointValue>> = by_name(&reference, &expected).into_iter().map(|(k, s)| (k, s.value)).collect();
            let actual: BTreeMap<String, Option<PointValue>> = seen.iter().map(|(k, s)| (k.clone(), s.value.clone())).collect();
            prop_assert_eq!(actual, expected);
        }
    }
}

#[test]
fn the_example_plants_chain_computes_heat_and_efficiency() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let report = tagstream_crds::manifest::load(&[examples]).unwrap();
    let sites = tagstream_core::config::sites(&report);
    let mut calc = sites[0].calc();
    let out = set(
        &mut calc,
        7,
        &[
            (("boiler", "temperature_in"), num(60.0, 7)),
            (("boiler", "temperature_out"), num(80.0, 7)),
            (("boiler", "flow"), num(4.0, 7)),
            (("meter", "active_power"), num(100.0, 7)),
        ],
    );
    let values = by_name(&calc, &out);
    let value = |name: &str| match values[name].value {
        Some(PointValue::Double(v)) => v,
        ref other => panic!("{name}: {other:?}"),
    };
    assert!((value("boiler-delta-t") - 20.0).abs() < 1e-9);
    assert!((value("boiler-heat-output") - 93.04).abs() < 1e-9);
    assert!((value("boiler-efficiency") - 93.04).abs() < 1e-9);
}

/// A tag removed by a reload and added back later starts without a value: it used to keep
/// the one polled before its removal, and a formula reading it was evaluated from that
/// old value with quality Good (issue 28).
#[test]
fn a_tag_removed_and_added_back_does_not_keep_its_old_value() {
    let formulas = vec![formula("doubled-flow", &[("f", "boiler/flow")], "f * 2")];
    let mut calc = calc(&formulas);
    set(&mut calc, 1, &[(("boiler", "flow"), num(2.0, 1))]);
    let without_flow: Vec<(&str, &str)> = TAGS.into_iter().filter(|t| t.1 != "flow").collect();
    calc.configure(without_flow, &[]);
    calc.configure(TAGS, &formulas);
    let mut out = Vec::new();
    calc.update([], 2, &mut out);
    let values = by_name(&calc, &out);
    assert!(
        values
            .get("doubled-flow")
            .is_none_or(|s| s.value.is_none() && s.quality.level != QualityLevel::Good),
        "the re-added tag brought its old value back: {values:?}"
    );
}
