//! docs/configuration.md's key table held to the code: every key a row
//! names is a key, and every default it gives as TOML values is the
//! default `RawConfig` has.

use serde_json::Value;

use crate::raw::RawConfig;

/// The backticked items of a cell, if the cell is nothing else.
fn only_code(cell: &str) -> Option<Vec<&str>> {
    let items: Vec<&str> = cell.split(", ").map(str::trim).collect();
    items
        .iter()
        .map(|i| {
            i.strip_prefix('`')?
                .strip_suffix('`')
                .filter(|v| !v.contains('`'))
        })
        .collect()
}

/// Numbers compared as numbers (`1` documents the float 1.0).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

#[test]
fn the_documented_keys_and_defaults_are_the_code_s() {
    let doc = include_str!("../../../docs/configuration.md");
    let defaults = serde_json::to_value(RawConfig::default()).unwrap();
    let at = |key: &str| {
        key.split('.')
            .try_fold(&defaults, |v, part| v.get(part))
            .cloned()
    };
    let (mut keys_seen, mut defaults_checked) = (0, 0);
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        let Some(keys) = only_code(cells[0]) else {
            continue;
        };
        if keys == ["[[route]]"] {
            continue;
        }
        for key in &keys {
            assert!(
                at(key).is_some(),
                "docs/configuration.md names `{key}`, which is no key"
            );
            keys_seen += 1;
        }
        let Some(values) = cells.get(1).and_then(|c| only_code(c)) else {
            continue;
        };
        assert_eq!(keys.len(), values.len(), "{line}");
        for (key, value) in keys.iter().zip(values) {
            let documented: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .unwrap_or_else(|e| panic!("`{key}`: `{value}` is not TOML: {e}"))
                .remove("v")
                .unwrap();
            let documented = serde_json::to_value(documented).unwrap();
            let actual = at(key).unwrap();
            assert!(
                same(&documented, &actual),
                "docs/configuration.md gives `{key}` the default `{value}`; the code has {actual}"
            );
            defaults_checked += 1;
        }
    }
    assert!(
        keys_seen >= 60 && defaults_checked >= 50,
        "{keys_seen} keys, {defaults_checked} defaults"
    );
}

/// Every TOML example of the README and the docs is a configuration forkd
/// takes as written (alone, on top of the defaults).
#[test]
fn every_toml_example_in_the_docs_is_a_valid_config() {
    // Every page, so that a new one is checked without being listed.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut paths = vec![std::path::PathBuf::from(format!("{root}/README.md"))];
    for entry in std::fs::read_dir(format!("{root}/docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            paths.push(path);
        }
    }
    let pages: Vec<(String, String)> = paths
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read_to_string(p).unwrap()))
        .collect();
    let mut checked = 0;
    for (page, text) in &pages {
        let mut block: Option<String> = None;
        for line in text.lines() {
            match (&mut block, line) {
                (None, "```toml") => block = Some(String::new()),
                (Some(b), "```") => {
                    let example = std::mem::take(b);
                    block = None;
                    let valid = toml::from_str::<RawConfig>(&example)
                        .map_err(|e| e.to_string())
                        .and_then(|raw| raw.validate(2).map_err(|e| e.to_string()));
                    if let Err(e) = valid {
                        panic!("{page}: this example is refused: {e}\n{example}");
                    }
                    checked += 1;
                }
                (Some(b), l) => {
                    b.push_str(l);
                    b.push('\n');
                }
                _ => {}
            }
        }
    }
    assert!(checked >= 5, "{checked} TOML examples");
}
