//! Every snippet a user copies from README.md and docs/*.md: manifests go through
//! `check` (a fragment of a Site or Device spec inside a complete object), and every
//! command of the project's binaries names a subcommand and flags that exist, every
//! script and repository path it names exists (issue 29: README's objects failed
//! `check`, and two documents named a folder that applies no simulator).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents users read, and their fenced blocks as (document, language, text).
fn blocks() -> Vec<(String, String, String)> {
    let mut documents = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    documents.extend(docs);
    let mut blocks = Vec::new();
    for document in documents {
        let text = std::fs::read_to_string(&document).unwrap();
        let name = document.file_name().unwrap().to_string_lossy().into_owned();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(language) = line.trim_start().strip_prefix("```").filter(|l| !l.is_empty()) else {
                continue;
            };
            let indent = line.len() - line.trim_start().len();
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| l.trim_start() != "```")
                .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
                .collect();
            blocks.push((name.clone(), language.to_owned(), body.join("\n") + "\n"));
        }
    }
    blocks
}

fn ingestor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tagstream-ingestor"))
}

/// Runs `check` on `manifests`; its output when it fails.
fn check(manifests: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("snippet.yaml"), manifests).unwrap();
    let output = ingestor().args(["check", "-f"]).arg(dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    if output.status.success() { Ok(()) } else { Err(text) }
}

/// A Site named `name` with the API's defaults, for snippets whose objects name one.
fn site(name: &str, spec: &str) -> String {
    let spec = if spec.is_empty() { "spec: {}\n" } else { spec };
    format!("---\napiVersion: tagstream.io/v1alpha1\nkind: Site\nmetadata: {{name: {name}}}\n{spec}")
}

/// A snippet as `check` can take it: whole objects with the Sites they name, a `spec:`
/// fragment as a Site's, a `tags:` fragment as a Device's; `None` for what is not a
/// tagstream object (another chart's values).
fn as_manifests(snippet: &str) -> Option<String> {
    if snippet.starts_with("apiVersion:") {
        let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(snippet)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let defined: Vec<&str> = documents
            .iter()
            .filter(|d| d["kind"] == "Site")
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        let mut named: Vec<&str> = documents.iter().filter_map(|d| d["spec"]["site"].as_str()).collect();
        named.sort_unstable();
        named.dedup();
        let missing = named.into_iter().filter(|s| !defined.contains(s));
        return Some(missing.fold(snippet.to_owned(), |all, name| all + &site(name, "")));
    }
    if snippet.starts_with("spec:") {
        return Some(site("snippet", snippet));
    }
    if snippet.starts_with("tags:") {
        let tags = snippet.lines().fold(String::new(), |all, l| all + "  " + l + "\n");
        let device = format!(
            "apiVersion: tagstream.io/v1alpha1\nkind: Device\nmetadata: {{name: snippet}}\nspec:\n  site: snippet\n  connection: {{tcp: {{host: 127.0.0.1}}}}\n{tags}"
        );
        return Some(device + &site("snippet", ""));
    }
    None
}

#[test]
fn every_manifest_snippet_passes_check() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for (document, language, text) in blocks() {
        if language != "yaml" {
            continue;
        }
        let Some(manifests) = as_manifests(&text) else {
            continue;
        };
        checked += 1;
        if let Err(output) = check(&manifests) {
            failures.push(format!("{document}:\n{text}\n{output}"));
        }
    }
    assert!(checked >= 8, "only {checked} manifest snippets found");
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

/// Shell lines, continuations joined, prompts and comments gone.
fn command_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("$ ").unwrap_or(line);
        if current.is_empty() && (line.starts_with('#') || line.is_empty()) {
            continue;
        }
        let (part, continued) = match line.strip_suffix('\\') {
            Some(part) => (part, true),
            None => (line, false),
        };
        current.push_str(part.split(" # ").next().unwrap_or(part));
        current.push(' ');
        if !continued {
            lines.push(current.trim().to_owned());
            current.clear();
        }
    }
    lines
}

/// The project binary a command line runs, and its arguments.
fn invocation(line: &str) -> Option<(&'static str, Vec<&str>)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    for (binary, prefixes) in [
        (
            "tagstream-ingestor",
            &[
                &["tagstream-ingestor"][..],
                &["target/debug/tagstream-ingestor"],
                &["cargo", "run", "-p", "tagstream-ingestor", "--"],
            ][..],
        ),
        (
            "tagstream-operator",
            &[
                &["tagstream-operator"][..],
                &["cargo", "run", "-p", "tagstream-operator", "--"],
            ][..],
        ),
    ] {
        for prefix in prefixes {
            if words.starts_with(prefix) {
                return Some((binary, words[prefix.len()..].to_vec()));
            }
        }
    }
    None
}

/// `binary`'s help for `subcommand` (or its own), built by cargo for this test run.
fn help(binary: &str, subcommand: Option<&str>) -> String {
    let mut command = if binary == "tagstream-ingestor" {
        ingestor()
    } else {
        let built = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "tagstream-operator",
                "--bin",
                "tagstream-operator",
            ])
            .current_dir(root())
            .status()
            .unwrap();
        assert!(built.success(), "cannot build tagstream-operator");
        let deps = std::env::current_exe().unwrap();
        Command::new(deps.parent().unwrap().parent().unwrap().join("tagstream-operator"))
    };
    command.args(subcommand).arg("--help");
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{binary} {subcommand:?} --help: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn every_documented_command_names_what_exists() {
    let mut problems = Vec::new();
    let mut commands = 0;
    // One `--help` per subcommand (and one build of the operator), not one per line.
    let mut helps = std::collections::HashMap::new();
    for (document, language, text) in blocks() {
        if language != "sh" {
            continue;
        }
        for line in command_lines(&text) {
            let words: Vec<&str> = line.split_whitespace().collect();
            for (i, word) in words.iter().enumerate() {
                let path = word.trim_matches(|c| c == '\'' || c == '"' || c == '`');
                let in_repository = ["scripts/", "deploy/", "charts/", "docs/", "e2e/"]
                    .iter()
                    .any(|p| path.starts_with(p));
                // A file: run, or given with -f/-k, or with an extension or a trailing slash
                // (`deploy/nats-box` after `kubectl exec` is a Deployment, not a path).
                let before = i.checked_sub(1).map(|j| words[j]);
                let file_like = i == 0
                    || matches!(before, Some("-f" | "-k" | "--filename"))
                    || path.ends_with('/')
                    || path.rsplit('/').next().is_some_and(|last| last.contains('.'));
                if in_repository && file_like && !path.contains('<') && !root().join(path).exists() {
                    problems.push(format!("{document}: `{line}`: {path} does not exist"));
                }
            }
            let Some((binary, args)) = invocation(&line) else {
                continue;
            };
            commands += 1;
            let subcommand = (binary == "tagstream-ingestor").then(|| args[0]);
            let help = helps
                .entry((binary, subcommand.map(str::to_owned)))
                .or_insert_with(|| help(binary, subcommand));
            for flag in args.iter().filter(|a| a.starts_with("--")) {
                let flag = flag.split('=').next().unwrap();
                if !help.contains(&format!("{flag} ")) && !help.contains(&format!("{flag}\n")) {
                    problems.push(format!("{document}: `{line}`: {binary} {subcommand:?} has no {flag}"));
                }
            }
        }
    }
    assert!(commands >= 10, "only {commands} commands found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
