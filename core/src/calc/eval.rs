//! The incremental evaluator.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet},
    sync::Arc,
};

use evalexpr::{Context, EvalexprError, EvalexprResult, Node, Value};
use tagstream_crds::FormulaSpec;

use super::{CompiledFormula, FormulaError, Input, compile, graph};
use crate::point::{PointValue, Quality, QualityLevel, Sample};

/// A tag or a formula result. Ids are stable for the life of a [`Calc`], across
/// reconfigurations, so callers resolve their tags once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SignalId(u32);

/// A formula's position in the evaluation order; valid until the next [`Calc::configure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FormulaId(u32);

/// A formula result produced by [`Calc::update`].
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    pub formula: FormulaId,
    pub sample: Sample,
}

/// What [`Calc::configure`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconfigured {
    /// Formulas compiled because they are new or changed.
    pub compiled: usize,
    /// Formulas kept as they were, with their last result.
    pub reused: usize,
    /// Formulas no longer configured.
    pub removed: usize,
}

/// The latest value of a signal, held in the form the expressions read.
#[derive(Debug)]
struct Latest {
    value: Option<Value>,
    timestamp_ns: i64,
    quality: Quality,
}

impl Latest {
    fn of(sample: &Sample) -> Self {
        Self {
            value: sample.value.as_ref().map(expression_value),
            timestamp_ns: sample.timestamp_ns,
            quality: sample.quality.clone(),
        }
    }

    /// Stores `sample` in `slot`, reusing what is there: every polled point passes here,
    /// and dropping and rebuilding the entry showed in the ingestor's profile.
    fn store(slot: &mut Option<Self>, sample: &Sample) {
        match slot {
            Some(latest) => {
                latest.value = sample.value.as_ref().map(expression_value);
                latest.timestamp_ns = sample.timestamp_ns;
                latest.quality.clone_from(&sample.quality);
            }
            None => *slot = Some(Self::of(sample)),
        }
    }
}

#[derive(Debug)]
struct FormulaNode {
    compiled: Arc<CompiledFormula>,
    /// The signal each variable reads, parallel to `compiled.variables`.
    inputs: Vec<SignalId>,
    output: SignalId,
    stale_after_ns: Option<i64>,
}

/// Formulas waiting to be evaluated in this batch, smallest topological rank first; each
/// at most once.
#[derive(Debug, Default)]
struct Frontier {
    heap: BinaryHeap<Reverse<u32>>,
    queued: Vec<bool>,
}

impl Frontier {
    fn push(&mut self, formula: FormulaId) {
        let slot = &mut self.queued[formula.0 as usize];
        if !*slot {
            *slot = true;
            self.heap.push(Reverse(formula.0));
        }
    }

    fn pop(&mut self) -> Option<FormulaId> {
        let Reverse(rank) = self.heap.pop()?;
        self.queued[rank as usize] = false;
        Some(FormulaId(rank))
    }
}

/// The calculation DAG of one site.
#[derive(Debug, Default)]
pub struct Calc {
    signals: HashMap<Input, SignalId>,
    latest: Vec<Option<Latest>>,
    dependents: Vec<Vec<FormulaId>>,
    nodes: Vec<FormulaNode>,
    compiled: HashMap<String, Result<Arc<CompiledFormula>, FormulaError>>,
    issues: BTreeMap<String, FormulaError>,
    frontier: Frontier,
}

impl Calc {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a site's tags and formulas. Unchanged formulas keep their compiled tree and
    /// last result; new and changed ones are compiled, and evaluated (with what depends on
    /// them) by the next [`Calc::update`], even an empty one; the order is planned again.
    pub fn configure<'a>(
        &mut self,
        tags: impl IntoIterator<Item = (&'a str, &'a str)>,
        formulas: &[(String, FormulaSpec)],
    ) -> Reconfigured {
        let tags: HashSet<(&str, &str)> = tags.into_iter().collect();
        for (device, tag) in &tags {
            self.intern(Input::Tag {
                device: (*device).to_owned(),
                tag: (*tag).to_owned(),
            });
        }
        // A tag the site no longer has forgets its value: its id stays (ids are indices),
        // but if it comes back it starts unpolled rather than with what was polled
        // before its removal.
        for (input, id) in &self.signals {
            if let Input::Tag { device, tag } = input
                && !tags.contains(&(device.as_str(), tag.as_str()))
            {
                self.latest[id.0 as usize] = None;
            }
        }

        let mut outcome = Reconfigured::default();
        let mut fresh = HashSet::new();
        let mut compiled = HashMap::with_capacity(formulas.len());
        for (name, spec) in formulas {
            let previous = self.compiled.remove(name);
            let unchanged = matches!(&previous, Some(Ok(c)) if c.spec == *spec);
            let entry = match previous {
                Some(Ok(c)) if unchanged => {
                    outcome.reused += 1;
                    Ok(c)
                }
                _ => {
                    outcome.compiled += 1;
                    fresh.insert(name.as_str());
                    // A changed formula's old result no longer describes it.
                    if let Some(id) = self.signals.get(&Input::Formula(name.clone())) {
                        self.latest[id.0 as usize] = None;
                    }
                    compile(name, spec).map(Arc::new)
                }
            };
            compiled.insert(name.clone(), entry);
        }
        outcome.removed = self.compiled.len();
        self.compiled = compiled;

        let mut names: Vec<&String> = self.compiled.keys().collect();
        names.sort();
        let planned: Vec<(&str, Result<&CompiledFormula, &FormulaError>)> = names
            .iter()
            .map(|name| (name.as_str(), self.compiled[*name].as_ref().map(AsRef::as_ref)))
            .collect();
        let plan = graph::plan(&planned, |device, tag| tags.contains(&(device, tag)));
        let order: Vec<Arc<CompiledFormula>> = plan
            .order
            .iter()
            .filter_map(|&i| self.compiled[names[i]].as_ref().ok().map(Arc::clone))
            .collect();
        self.issues = plan.issues;

        self.nodes = order.into_iter().map(|compiled| self.node(compiled)).collect();
        for list in &mut self.dependents {
            list.clear();
        }
        for (rank, node) in self.nodes.iter().enumerate() {
            for input in &node.inputs {
                self.dependents[input.0 as usize].push(FormulaId(rank as u32));
            }
        }
        self.frontier = Frontier {
            heap: BinaryHeap::new(),
            queued: vec![false; self.nodes.len()],
        };
        // New and changed formulas are evaluated by the next update, with their dependents.
        for (rank, node) in self.nodes.iter().enumerate() {
            if fresh.contains(node.compiled.name.as_str()) {
                self.frontier.push(FormulaId(rank as u32));
            }
        }
        outcome
    }

    fn node(&mut self, compiled: Arc<CompiledFormula>) -> FormulaNode {
        let inputs = compiled
            .variables
            .iter()
            .map(|(_, input)| self.intern(input.clone()))
            .collect();
        let output = self.intern(Input::Formula(compiled.name.clone()));
        let stale_after_ns = compiled
            .spec
            .stale_after
            .map(|d| i64::try_from(d.get().as_nanos()).unwrap_or(i64::MAX));
        FormulaNode {
            compiled,
            inputs,
            output,
            stale_after_ns,
        }
    }

    fn intern(&mut self, input: Input) -> SignalId {
        let next = SignalId(self.latest.len() as u32);
        let id = *self.signals.entry(input).or_insert(next);
        if id == next {
            self.latest.push(None);
            self.dependents.push(Vec::new());
        }
        id
    }

    /// The id of a polled tag, if the site has it.
    pub fn tag_signal(&self, device: &str, tag: &str) -> Option<SignalId> {
        self.signals
            .get(&Input::Tag {
                device: device.to_owned(),
                tag: tag.to_owned(),
            })
            .copied()
    }

    /// Formulas that are not evaluated, and why.
    pub fn issues(&self) -> &BTreeMap<String, FormulaError> {
        &self.issues
    }

    /// The valid formulas in evaluation order.
    pub fn order(&self) -> impl Iterator<Item = &CompiledFormula> {
        self.nodes.iter().map(|n| n.compiled.as_ref())
    }

    /// For each valid formula, the formulas it reads directly or through others, in
    /// evaluation order (what the operator shows in a Formula's status).
    pub fn dependency_order(&self) -> BTreeMap<String, Vec<String>> {
        let mut rank_of: HashMap<&str, usize> = HashMap::new();
        let mut closure: Vec<BTreeSet<usize>> = Vec::with_capacity(self.nodes.len());
        for (rank, formula) in self.order().enumerate() {
            let mut reads = BTreeSet::new();
            for (_, input) in &formula.variables {
                if let Input::Formula(name) = input
                    && let Some(&dependency) = rank_of.get(name.as_str())
                {
                    reads.insert(dependency);
                    reads.extend(closure[dependency].iter().copied());
                }
            }
            rank_of.insert(&formula.name, rank);
            closure.push(reads);
        }
        let names: Vec<&str> = self.order().map(|f| f.name.as_str()).collect();
        names
            .iter()
            .zip(closure)
            .map(|(name, reads)| {
                (
                    (*name).to_owned(),
                    reads.into_iter().map(|r| names[r].to_owned()).collect(),
                )
            })
            .collect()
    }

    /// A formula by its id.
    pub fn formula(&self, id: FormulaId) -> &CompiledFormula {
        &self.nodes[id.0 as usize].compiled
    }

    /// Records a batch of changed signals (one poll cycle) and evaluates every formula they
    /// affect, once each, in dependency order. Results are appended to `out`. `now_ns` is
    /// the time staleness is measured against.
    pub fn update<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (SignalId, &'a Sample)>,
        now_ns: i64,
        out: &mut Vec<Derived>,
    ) {
        for (signal, sample) in changes {
            Latest::store(&mut self.latest[signal.0 as usize], sample);
            for &formula in &self.dependents[signal.0 as usize] {
                self.frontier.push(formula);
            }
        }
        while let Some(formula) = self.frontier.pop() {
            self.evaluate_into(formula, now_ns, out);
        }
    }

    /// Evaluates every formula in dependency order, whatever changed: the reference the
    /// incremental path is tested against, and a refresh after a restart.
    pub fn evaluate_all(&mut self, now_ns: i64, out: &mut Vec<Derived>) {
        for rank in 0..self.nodes.len() {
            self.evaluate_into(FormulaId(rank as u32), now_ns, out);
        }
    }

    fn evaluate_into(&mut self, formula: FormulaId, now_ns: i64, out: &mut Vec<Derived>) {
        let Some(sample) = self.evaluate(formula, now_ns) else {
            return;
        };
        let output = self.nodes[formula.0 as usize].output;
        Latest::store(&mut self.latest[output.0 as usize], &sample);
        for &dependent in &self.dependents[output.0 as usize] {
            self.frontier.push(dependent);
        }
        out.push(Derived { formula, sample });
    }

    /// The formula's result from the latest input values; `None` until every input has
    /// had a value.
    fn evaluate(&self, formula: FormulaId, now_ns: i64) -> Option<Sample> {
        let node = &self.nodes[formula.0 as usize];
        let mut newest = i64::MIN;
        let mut quality = Quality::GOOD;
        for ((variable, _), signal) in node.compiled.variables.iter().zip(&node.inputs) {
            let input = self.latest[signal.0 as usize].as_ref()?;
            newest = newest.max(input.timestamp_ns);
            match input.quality.level {
                QualityLevel::Bad => degrade(&mut quality, QualityLevel::Bad, || format!("input {variable} is bad")),
                QualityLevel::Uncertain => {
                    degrade(&mut quality, QualityLevel::Uncertain, || {
                        format!("input {variable} is uncertain")
                    });
                }
                QualityLevel::Good => {}
            }
            if node
                .stale_after_ns
                .is_some_and(|limit| now_ns.saturating_sub(input.timestamp_ns) > limit)
            {
                degrade(&mut quality, QualityLevel::Uncertain, || {
                    format!("input {variable} is stale")
                });
            }
        }
        if quality.level == QualityLevel::Bad {
            return Some(Sample {
                value: None,
                timestamp_ns: newest,
                quality,
            });
        }
        let context = InputsContext {
            node,
            latest: &self.latest,
        };
        let sample = match evaluate_tree(&node.compiled.tree, &context) {
            Ok(value) => Sample {
                value: Some(value),
                timestamp_ns: newest,
                quality,
            },
            Err(reason) => Sample::bad(reason, newest),
        };
        Some(sample)
    }
}

/// Lowers `quality` to `level` if that is worse, with the reason; the first reason of the
/// worst level wins, and no reason is formatted unless it is kept.
fn degrade(quality: &mut Quality, level: QualityLevel, reason: impl FnOnce() -> String) {
    if level > quality.level {
        *quality = Quality {
            level,
            reason: Some(reason()),
        };
    }
}

fn evaluate_tree(tree: &Node, context: &InputsContext<'_>) -> Result<PointValue, String> {
    match tree.eval_with_context(context) {
        Ok(Value::Float(f)) if f.is_finite() => Ok(PointValue::Double(f)),
        Ok(Value::Float(f)) => Err(format!("the result is {f} (division by zero?)")),
        Ok(Value::Int(i)) => Ok(PointValue::Int(i)),
        Ok(Value::Boolean(b)) => Ok(PointValue::Bool(b)),
        Ok(Value::String(s)) => Ok(PointValue::String(s)),
        Ok(Value::Tuple(_)) => Err("the expression gives a tuple, not one value".into()),
        Ok(Value::Empty) => Err("the expression gives no value".into()),
        Err(e) => Err(format!("evaluation failed: {e}")),
    }
}

fn expression_value(value: &PointValue) -> Value {
    match value {
        PointValue::Bool(b) => Value::Boolean(*b),
        PointValue::Int(i) => Value::Int(*i),
        PointValue::UInt(u) => i64::try_from(*u).map_or(Value::Float(*u as f64), Value::Int),
        PointValue::Double(f) => Value::Float(*f),
        PointValue::String(s) => Value::String(s.clone()),
    }
}

/// What an expression sees: its variables, looked up by a scan of its few input names
/// rather than a map, so evaluating builds no map and hashes no string.
struct InputsContext<'a> {
    node: &'a FormulaNode,
    latest: &'a [Option<Latest>],
}

impl Context for InputsContext<'_> {
    fn get_value(&self, identifier: &str) -> Option<&Value> {
        let position = self.node.compiled.variables.iter().position(|(v, _)| v == identifier)?;
        let signal = self.node.inputs[position];
        self.latest[signal.0 as usize].as_ref()?.value.as_ref()
    }

    fn call_function(&self, identifier: &str, _argument: &Value) -> EvalexprResult<Value> {
        // Only builtins are offered; this error hands the call to them.
        Err(EvalexprError::FunctionIdentifierNotFound(identifier.to_owned()))
    }

    fn are_builtin_functions_disabled(&self) -> bool {
        false
    }

    fn set_builtin_functions_disabled(&mut self, disabled: bool) -> EvalexprResult<()> {
        if disabled {
            Err(EvalexprError::BuiltinFunctionsCannotBeDisabled)
        } else {
            Ok(())
        }
    }
}
