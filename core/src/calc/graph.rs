//! The dependency graph between formulas: cycles, invalid inputs and the evaluation order.

use std::collections::{BTreeMap, HashMap};

use petgraph::{algo::tarjan_scc, graph::DiGraph};

use super::{CompiledFormula, FormulaError, Input};

/// The outcome of planning: which formulas run, in which order, and why the others do not.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Indices into the planned formulas, in topological order (inputs first).
    pub order: Vec<usize>,
    pub issues: BTreeMap<String, FormulaError>,
}

/// Orders `formulas` (compiled or not) so that every formula comes after the formulas it
/// reads. `tag_exists` says whether a polled tag exists in the site.
pub(super) fn plan(
    formulas: &[(&str, Result<&CompiledFormula, &FormulaError>)],
    tag_exists: impl Fn(&str, &str) -> bool,
) -> Plan {
    let mut plan = Plan::default();
    let index: HashMap<&str, usize> = formulas.iter().enumerate().map(|(i, (name, _))| (*name, i)).collect();
    let mut graph = DiGraph::<usize, ()>::with_capacity(formulas.len(), formulas.len());
    let nodes: Vec<_> = (0..formulas.len()).map(|i| graph.add_node(i)).collect();

    for (i, (name, compiled)) in formulas.iter().enumerate() {
        let compiled = match compiled {
            Ok(compiled) => compiled,
            Err(e) => {
                plan.issues.insert((*name).to_owned(), (*e).clone());
                continue;
            }
        };
        for (variable, input) in &compiled.variables {
            let source = match input {
                Input::Tag { device, tag } => tag_exists(device, tag).then_some(None),
                Input::Formula(other) => index.get(other.as_str()).map(|&j| Some(j)),
            };
            match source {
                None => {
                    plan.issues.insert(
                        (*name).to_owned(),
                        FormulaError::UnknownInput {
                            variable: variable.clone(),
                            reference: input.to_string(),
                        },
                    );
                }
                Some(Some(j)) => {
                    graph.add_edge(nodes[j], nodes[i], ());
                }
                Some(None) => {}
            }
        }
    }

    // Tarjan yields strongly connected components in reverse topological order.
    let mut components = tarjan_scc(&graph);
    components.reverse();
    for component in components {
        let on_cycle = component.len() > 1 || graph.contains_edge(component[0], component[0]);
        if on_cycle {
            let mut members: Vec<String> = component.iter().map(|n| formulas[graph[*n]].0.to_owned()).collect();
            members.sort();
            for member in &members {
                plan.issues
                    .entry(member.clone())
                    .or_insert_with(|| FormulaError::Cycle {
                        members: members.clone(),
                    });
            }
            continue;
        }
        let i = graph[component[0]];
        let name = formulas[i].0;
        if plan.issues.contains_key(name) {
            continue;
        }
        let Ok(compiled) = &formulas[i].1 else { continue };
        let invalid_input = compiled.variables.iter().find_map(|(variable, input)| match input {
            Input::Formula(other) if plan.issues.contains_key(other.as_str()) => Some((variable, other)),
            _ => None,
        });
        if let Some((variable, other)) = invalid_input {
            plan.issues.insert(
                name.to_owned(),
                FormulaError::InvalidInput {
                    variable: variable.clone(),
                    formula: other.clone(),
                },
            );
            continue;
        }
        plan.order.push(i);
    }
    plan
}
