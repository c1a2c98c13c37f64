//! The runtime and data directories and the files forkd makes in them:
//! private to the service user, never written through a planted link.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_planted_pidfile_link_is_refused_and_never_written_through() {
    let f = Forkd::configure("workers = 1\n");
    let run = f.dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let precious = f.dir.path().join("precious");
    std::fs::write(&precious, "keep me\n").unwrap();
    std::os::unix::fs::symlink(&precious, run.join("forkd.pid")).unwrap();
    let out = f.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("forkd.pid") && stderr(&out).contains("symbolic link"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me\n");
    assert!(port_free(f.port));
}

#[test]
fn a_runtime_dir_others_may_write_to_is_refused() {
    let f = Forkd::configure("workers = 1\n");
    let run = f.dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = f.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("runtime directory") && err.contains(&run.display().to_string()),
        "{err}"
    );
    assert!(err.contains("chmod 0700"), "{err}");
    assert!(!run.join("forkd.pid").exists());
    // A link in place of the directory is refused too.
    std::fs::remove_dir(&run).unwrap();
    let elsewhere = f.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &run).unwrap();
    let out = f.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
}

#[test]
fn a_runtime_dir_of_another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        return skip("not root: cannot give a directory to another user");
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        return skip("no user 'nobody'");
    };
    let f = Forkd::configure("workers = 1\n");
    let run = f.dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&run, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let out = f.cli(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&run.display().to_string()) && err.contains(&format!("uid {}", nobody.uid)),
        "{err}"
    );
}

#[test]
fn runtime_and_data_directories_and_the_store_are_private() {
    let f = Forkd::start("workers = 1\n");
    let run = f.dir.path().join("run");
    let data = f.dir.path().join("data");
    assert_eq!(mode(&run), 0o700);
    assert_eq!(mode(&data), 0o700);
    // Something in the append-only file: a user and a session.
    f.add_user("ada", "correct horse battery");
    token(f.port, "ada", "correct horse battery");
    let mut files = Vec::new();
    let mut dirs = vec![data.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(!files.is_empty(), "redis-server wrote its files");
    for p in &files {
        assert_eq!(mode(p) & 0o077, 0, "{} is {:04o}", p.display(), mode(p));
    }
    assert_eq!(mode(&run.join("forkd.sock")), 0o600);
}

#[test]
fn no_runtime_directory_in_tmp_for_a_user_without_a_session() {
    if !nix::unistd::geteuid().is_root() {
        return skip("not root: cannot run the CLI as another user");
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        return skip("setpriv (util-linux) is missing");
    }
    // A config any user may read, without runtime_dir.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("forkd.toml");
    std::fs::write(&config, "workers = 1\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |command: &str| {
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(BIN)
            .arg("--config")
            .arg(&config)
            .arg(command)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("RUNTIME_DIRECTORY")
            .output()
            .unwrap()
    };
    let out = as_nobody("status");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no runtime directory") && err.contains("runtime_dir"),
        "{err}"
    );
    let uid = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    assert!(!Path::new(&format!("/tmp/forkd-{uid}")).exists());
    // The shipped config's comment names no fallback in /tmp either.
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/forkd.toml")).unwrap();
    assert!(!shipped.contains("/tmp/forkd"), "config/forkd.toml");
    // What it suggests is a line the config takes as written.
    let line = err
        .split("e.g. ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no example in {err}"));
    assert!(line.starts_with("runtime_dir = \"/"), "{line}");
    std::fs::write(&config, format!("workers = 1\n{line}\n")).unwrap();
    let out = as_nobody("check-config");
    assert!(out.status.success(), "{line}: {}", stderr(&out));
}
