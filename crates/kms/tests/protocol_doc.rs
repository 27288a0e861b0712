//! `docs/kms-api.md` and the wire contract in `ppml_kms::protocol` say the same: the actions of
//! §5 and the error table of §6 (code, message, kind) list exactly the enums' values.

use std::collections::BTreeSet;

use ppml_kms::protocol::{Action, ErrorKind};

fn doc() -> String {
    let path = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("../../docs/kms-api.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of the section whose heading starts with `heading`.
fn section<'a>(doc: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(heading));
    let mut out = vec![lines.next().expect("section exists")];
    out.extend(lines.take_while(|l| !l.starts_with("## ")));
    out
}

/// The cells of a table row, without surrounding backticks.
fn cells(row: &str) -> Vec<String> {
    row.trim()
        .trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().trim_matches('`').to_string())
        .collect()
}

#[test]
fn the_error_table_is_the_error_kind_enum() {
    let doc = doc();
    let documented: BTreeSet<(u16, String, String)> = section(&doc, "## 6. Errors")
        .into_iter()
        .filter(|l| l.starts_with("| 400") || l.starts_with("| 404") || l.starts_with("| 500"))
        .map(|row| {
            let c = cells(row);
            (c[0].parse().unwrap(), c[1].clone(), c[2].clone())
        })
        .collect();
    let defined: BTreeSet<(u16, String, String)> = ErrorKind::ALL
        .into_iter()
        .map(|k| {
            let message = match k {
                k if k.has_detail() => format!("{}: <reason>", k.message()),
                _ => k.message().to_string(),
            };
            (k.code(), message, k.label().to_string())
        })
        .collect();
    assert_eq!(documented, defined);
    assert_eq!(defined.len(), ErrorKind::ALL.len());
}

#[test]
fn the_action_table_is_the_action_enum() {
    let doc = doc();
    let documented: BTreeSet<String> = section(&doc, "## 5. Actions")
        .into_iter()
        .take_while(|l| !l.starts_with("### "))
        .filter(|l| l.starts_with("| `"))
        .flat_map(|row| {
            let first = row.trim_start_matches('|').split(" | ").next().unwrap();
            first
                .split(['`', ','])
                .map(|w| w.split(" (").next().unwrap().trim().to_string())
                .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
                .filter(|w| !w.contains(' '))
                .collect::<Vec<_>>()
        })
        .collect();
    let defined: BTreeSet<String> = Action::ALL.iter().map(|a| a.name().to_string()).collect();
    assert_eq!(documented, defined);
}
