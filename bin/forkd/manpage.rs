//! `forkd manpage [DIR]`: forkd(1) and one page per command
//! (forkd-start(1), forkd-user-add(1), ...), generated from the clap
//! definitions so they cannot drift from the flags, plus the sections an
//! operator looks for that clap does not know about: signals, files, exit
//! status.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::Cli;

/// The sections after the generated ones in forkd(1), in roff.
const EXTRA: &str = r#".SH SIGNALS
The supervisor turns signals into the same actions as the commands:
.TP
\fBTERM\fR, \fBINT\fR
Graceful stop: /readyz fails at once; after \fBshutdown_delay\fR, stop
accepting, drain for up to \fBshutdown_timeout\fR, then kill.
.TP
\fBQUIT\fR
Fast stop: kill the workers at once.
.TP
\fBHUP\fR
Reload the configuration and replace the workers one by one (as \fBforkd reload\fR).
.TP
\fBUSR1\fR
Reopen \fBlog_file\fR and \fBaccess_log_file\fR (for logrotate).
.TP
\fBUSR2\fR
Upgrade to the binary on disk without dropping a request (as \fBforkd upgrade\fR).
.TP
\fBTTIN\fR, \fBTTOU\fR
One worker more, one fewer.
.SH FILES
.TP
\fI/etc/forkd/forkd.toml\fR
The configuration of forkd.service; \fI/etc/forkd/NAME.toml\fR is the one of
forkd@NAME.service. Every key is documented in the file itself.
.TP
\fI/run/forkd/\fR
The pidfile and control socket of each instance, and the socket of the
redis-server forkd manages when \fBredis.url\fR is empty.
.TP
\fI/var/lib/forkd/\fR
The data of the managed redis-server.
.SH ENVIRONMENT
.TP
\fBFORKD_CONFIG\fR
The configuration file, as \fB\-\-config\fR.
.TP
\fBFORKD_\fR\fIKEY\fR
Overrides a configuration key: the key in capitals with dots as
underscores, as \fBFORKD_WORKERS\fR or \fBFORKD_HTTP_MAX_CONNECTIONS\fR.
.TP
\fBRUST_LOG\fR
Overrides \fBlog_level\fR.
.SH EXIT STATUS
0 on success, 1 on a runtime failure (already running, port in use, not
running, a refused reload or upgrade), 64 on a usage or configuration error.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBsystemd.service\fR(5), \fBredis\-server\fR(1)
"#;

/// Prints forkd(1) to stdout, or with `dir` writes it and a page per
/// command there.
pub(crate) fn run(dir: Option<&Path>) -> anyhow::Result<()> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = dir else {
        return render_main(&cmd, &mut std::io::stdout().lock()).map_err(Into::into);
    };
    let path = dir.join("forkd.1");
    let mut f = std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?;
    render_main(&cmd, &mut f)?;
    write_commands(&cmd, dir)
}

fn render_main(cmd: &clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd.clone()).render(w)?;
    w.write_all(EXTRA.as_bytes())
}

/// One page for every visible command under `cmd`, named after its path
/// (forkd-user-add.1).
fn write_commands(cmd: &clap::Command, dir: &Path) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = clap_mangen::Man::new(sub.clone());
        let path = dir.join(man.get_filename());
        let mut f = std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?;
        man.render(&mut f)?;
        write_commands(sub, dir)?;
    }
    Ok(())
}

/// `forkd cli-reference`: docs/cli-reference.md, every visible command's
/// `--help` as the binary prints it (tests/cli.rs holds the file to it).
pub(crate) fn reference() -> anyhow::Result<()> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = String::from(
        "# CLI reference\n\n\
         Every command's `--help`, generated from forkd's own definitions by\n\
         `forkd cli-reference > docs/cli-reference.md`; the tests fail when this\n\
         file and the binary differ. What the commands are for, with examples:\n\
         [docs/cli.md](cli.md).\n",
    );
    reference_of(&mut cmd, "forkd", &mut out);
    out!("{out}");
    Ok(())
}

fn reference_of(cmd: &mut clap::Command, path: &str, out: &mut String) {
    let help = cmd.clone().bin_name(path).render_long_help().to_string();
    out.push_str(&format!(
        "\n## {path}\n\n```text\n{}\n```\n",
        help.trim_end()
    ));
    let subs: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    for mut sub in subs {
        let name = format!("{path} {}", sub.get_name());
        reference_of(&mut sub, &name, out);
    }
}
