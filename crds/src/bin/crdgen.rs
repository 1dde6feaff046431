//! Writes the generated CRD YAML to `crds/tagstream.io_crds.yaml` and the Helm chart's
//! `crds/` folder, or with `--check` fails when either differs from the Rust types.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let yaml = tagstream_crds::crds_yaml();
    let mut stale = false;
    for target in tagstream_crds::GENERATED_CRD_PATHS {
        let path = root.join(target);
        if check {
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current != yaml {
                eprintln!(
                    "{} is out of date: run `cargo run -p tagstream-crds --bin crdgen`",
                    path.display()
                );
                stale = true;
            }
        } else if let Err(e) = std::fs::write(&path, &yaml) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if stale { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
