//! docs/configuration.md's key table is the one the code makes, and the
//! code's table names every key of the file once; every TOML example of
//! the docs is a configuration forkd takes.

use crate::overrides::keys;
use crate::raw::RawConfig;
use crate::reference::{key_table, ROWS};

/// The table arrays: rows of their own, not keys.
const TABLE_ARRAYS: [&str; 1] = ["[[route]]"];

/// Keys of the file with no row, and keys of rows that are no key.
fn unlisted() -> (Vec<&'static str>, Vec<&'static str>) {
    let listed: Vec<&str> = ROWS.iter().flat_map(|r| r.keys.iter().copied()).collect();
    let missing = keys()
        .iter()
        .copied()
        .filter(|k| !listed.contains(k))
        .collect();
    let unknown = listed
        .into_iter()
        .filter(|k| !keys().contains(k) && !TABLE_ARRAYS.contains(k))
        .collect();
    (missing, unknown)
}

const BEGIN: &str = "<!-- the key table, made by `forkd config-reference` -->\n";
const END: &str = "<!-- end of the key table -->";

#[test]
fn the_page_s_key_table_is_the_code_s() {
    let doc = include_str!("../../../docs/configuration.md");
    let start = doc
        .find(BEGIN)
        .expect("docs/configuration.md marks its key table")
        + BEGIN.len();
    let end = start + doc[start..].find(END).expect("the key table ends");
    let made = key_table();
    assert!(
        doc[start..end] == made,
        "docs/configuration.md's key table is not the code's; put this in (forkd \
         config-reference prints it):\n{made}"
    );
}

#[test]
fn every_key_has_one_row() {
    let (missing, unknown) = unlisted();
    assert!(
        missing.is_empty(),
        "keys with no row in the reference: {missing:?}"
    );
    assert!(unknown.is_empty(), "rows naming no key: {unknown:?}");
    let mut all: Vec<&str> = ROWS.iter().flat_map(|r| r.keys.iter().copied()).collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "a key in two rows");
    assert!(n >= 60, "{n} keys");
}

#[test]
fn defaults_are_written_as_toml() {
    let table = key_table();
    for want in [
        "| `instance` | `\"forkd\"` |",
        "| `shutdown_timeout` | `30` |",
        "| `watchdog_quorum` | `0.5` |",
        "| `log_file` | unset (stderr) |",
        "| `metrics.allow` | `[\"127.0.0.0/8\", \"::1\"]` |",
        "| `auth.max_concurrent_hashes`, `auth.hash_queue_timeout` | `0`, `0.5` (`0`: one per core) |",
    ] {
        assert!(table.contains(want), "no {want} in:\n{table}");
    }
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
