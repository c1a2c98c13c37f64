//! docs/configuration.md's key table is the one the code makes, and the
//! code's table names every key of the file once.

use crate::overrides::keys;
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
