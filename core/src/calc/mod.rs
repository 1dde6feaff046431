//! The calculation DAG: Formulas evaluated in dependency order, only where an input changed.
//!
//! Each Formula is compiled once (evalexpr's operator tree, [`compile`]); its `inputs` give
//! the edges of a graph over formulas, checked for cycles and sorted topologically
//! ([`graph`]). Every tag and every formula result is a *signal* with a stable
//! [`SignalId`]; callers resolve their tags to ids once, when the configuration is applied,
//! so the hot path ([`Calc::update`]) does no string parsing, hashing or map allocation.
//!
//! `update` takes a batch of changed signals (one poll cycle), marks their direct dependents
//! and evaluates them in topological order with a min-heap on the topological rank: each
//! affected formula exactly once, after all of its affected inputs, with the latest value
//! of the others. A derived point takes the newest input timestamp and the worst input
//! quality: Bad when an input is Bad (and then no value), Uncertain when an input is
//! Uncertain or older than the formula's `staleAfter`. Evaluation errors (a string in
//! arithmetic, integer division by zero) and non-finite results are Bad points with the
//! reason, never a panic.
//!
//! A formula that does not compile, reads something that does not exist, sits on a cycle
//! or reads such a formula is reported in [`Calc::issues`] and left out; the rest run.

mod compile;
mod eval;
mod graph;

pub use compile::{CompiledFormula, Input, compile};
pub use eval::{Calc, Derived, FormulaId, Reconfigured, SignalId};

/// Why a formula is not evaluated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormulaError {
    #[error("expression does not parse: {message}")]
    Parse { message: String },
    #[error("identifier {identifier:?} is not one of the formula's inputs")]
    UnknownIdentifier { identifier: String },
    #[error("input {variable:?} is not used by the expression")]
    UnusedInput { variable: String },
    #[error("the expression assigns to {identifier:?}; a formula may only read its inputs")]
    Assignment { identifier: String },
    #[error("function {function:?} does not exist in evalexpr 11")]
    UnknownFunction { function: String },
    #[error("function {function:?} gives a different result every time; a derived tag must be repeatable")]
    Nondeterministic { function: String },
    #[error("input {variable:?} reads {reference}, which does not exist in this site")]
    UnknownInput { variable: String, reference: String },
    #[error("on a dependency cycle of the formulas {}", members.join(", "))]
    Cycle { members: Vec<String> },
    #[error("input {variable:?} reads formula {formula:?}, which is invalid")]
    InvalidInput { variable: String, formula: String },
}

impl FormulaError {
    /// A short CamelCase reason for a Kubernetes condition.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Parse { .. } => "ParseError",
            Self::UnknownIdentifier { .. } => "UnknownIdentifier",
            Self::UnusedInput { .. } => "UnusedInput",
            Self::Assignment { .. } => "Assignment",
            Self::UnknownFunction { .. } => "UnknownFunction",
            Self::Nondeterministic { .. } => "Nondeterministic",
            Self::UnknownInput { .. } => "UnknownInput",
            Self::Cycle { .. } => "Cycle",
            Self::InvalidInput { .. } => "InvalidInput",
        }
    }
}
