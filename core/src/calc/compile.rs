//! Compiling one Formula: parse its expression once into an operator tree and check that its
//! identifiers and its `inputs` agree.

use std::collections::BTreeSet;

use evalexpr::{Node, Operator};
use tagstream_crds::{FormulaSpec, InputRef};

use super::FormulaError;

/// What a variable of a formula reads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Input {
    /// A polled tag of a device.
    Tag { device: String, tag: String },
    /// Another formula's result.
    Formula(String),
}

impl Input {
    pub fn parse(reference: &str) -> Self {
        match InputRef::parse(reference) {
            InputRef::Tag { device, tag } => Self::Tag {
                device: device.to_owned(),
                tag: tag.to_owned(),
            },
            InputRef::Formula(name) => Self::Formula(name.to_owned()),
        }
    }
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tag { device, tag } => write!(f, "{device}/{tag}"),
            Self::Formula(name) => f.write_str(name),
        }
    }
}

/// A formula whose expression parsed and whose identifiers match its inputs.
#[derive(Debug)]
pub struct CompiledFormula {
    pub name: String,
    pub spec: FormulaSpec,
    pub(super) tree: Node,
    /// Variable names and what they read, in name order.
    pub variables: Vec<(String, Input)>,
}

/// Functions of evalexpr 11.3.1 that give a different result for the same inputs, which a
/// derived tag must not do.
const NONDETERMINISTIC_FUNCTIONS: [&str; 1] = ["random"];

/// Every builtin of evalexpr 11.3.1 (the version is pinned, so the list cannot drift), so
/// that an unknown function is reported when the formula is applied, not on every evaluation.
const BUILTIN_FUNCTIONS: [&str; 50] = [
    "math::ln",
    "math::log",
    "math::log2",
    "math::log10",
    "math::exp",
    "math::exp2",
    "math::pow",
    "math::cos",
    "math::acos",
    "math::cosh",
    "math::acosh",
    "math::sin",
    "math::asin",
    "math::sinh",
    "math::asinh",
    "math::tan",
    "math::atan",
    "math::tanh",
    "math::atanh",
    "math::atan2",
    "math::sqrt",
    "math::cbrt",
    "math::hypot",
    "floor",
    "round",
    "ceil",
    "math::is_nan",
    "math::is_finite",
    "math::is_infinite",
    "math::is_normal",
    "math::abs",
    "typeof",
    "min",
    "max",
    "if",
    "contains",
    "contains_any",
    "len",
    "str::to_lowercase",
    "str::to_uppercase",
    "str::trim",
    "str::from",
    "str::substring",
    "bitand",
    "bitor",
    "bitxor",
    "bitnot",
    "shl",
    "shr",
    "random",
];

/// Compiles one formula on its own; references to other objects are resolved by the graph.
pub fn compile(name: &str, spec: &FormulaSpec) -> Result<CompiledFormula, FormulaError> {
    let tree =
        evalexpr::build_operator_tree(&spec.expression).map_err(|e| FormulaError::Parse { message: e.to_string() })?;

    if tree.children().is_empty() {
        return Err(FormulaError::Parse {
            message: "the expression is empty".into(),
        });
    }
    check_operands(&tree)?;
    // A formula reads its inputs; an assignment (`a = 1`, `a += 1`) would write to them.
    if let Some(written) = tree.iter_write_variable_identifiers().next() {
        return Err(FormulaError::Assignment {
            identifier: written.to_owned(),
        });
    }
    let read: BTreeSet<&str> = tree.iter_read_variable_identifiers().collect();
    for function in tree.iter_function_identifiers() {
        if NONDETERMINISTIC_FUNCTIONS.contains(&function) {
            return Err(FormulaError::Nondeterministic {
                function: function.to_owned(),
            });
        }
        if !BUILTIN_FUNCTIONS.contains(&function) {
            return Err(FormulaError::UnknownFunction {
                function: function.to_owned(),
            });
        }
    }
    if let Some(unknown) = read.iter().find(|id| !spec.inputs.contains_key(**id)) {
        return Err(FormulaError::UnknownIdentifier {
            identifier: (*unknown).to_owned(),
        });
    }
    if let Some(unused) = spec.inputs.keys().find(|var| !read.contains(var.as_str())) {
        return Err(FormulaError::UnusedInput {
            variable: unused.clone(),
        });
    }
    let variables = spec
        .inputs
        .iter()
        .map(|(var, reference)| (var.clone(), Input::parse(reference)))
        .collect();
    Ok(CompiledFormula {
        name: name.to_owned(),
        spec: spec.clone(),
        tree,
        variables,
    })
}

/// evalexpr 11 parses an operator with a missing operand (`a +* 2`, `f *`) and fails only
/// when evaluating; find that when compiling instead.
fn check_operands(node: &Node) -> Result<(), FormulaError> {
    use Operator::{
        Add, AddAssign, And, AndAssign, Assign, Const, Div, DivAssign, Eq, Exp, ExpAssign, FunctionIdentifier, Geq, Gt,
        Leq, Lt, Mod, ModAssign, Mul, MulAssign, Neg, Neq, Not, Or, OrAssign, Sub, SubAssign, VariableIdentifierRead,
        VariableIdentifierWrite,
    };
    let operands = node.children().len();
    let expected = match node.operator() {
        Add | Sub | Mul | Div | Mod | Exp | Eq | Neq | Gt | Lt | Geq | Leq | And | Or | Assign | AddAssign
        | SubAssign | MulAssign | DivAssign | ModAssign | ExpAssign | AndAssign | OrAssign => Some(2),
        Not | Neg | FunctionIdentifier { .. } => Some(1),
        Const { .. } | VariableIdentifierRead { .. } | VariableIdentifierWrite { .. } => Some(0),
        _ => None,
    };
    if let Some(expected) = expected.filter(|&n| n != operands) {
        return Err(FormulaError::Parse {
            message: format!(
                "operator {} needs {expected} operand(s), found {operands}",
                node.operator()
            ),
        });
    }
    node.children().iter().try_for_each(check_operands)
}
