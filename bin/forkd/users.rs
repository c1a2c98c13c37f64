//! `forkd user ...`: user management straight against Redis (the CLI
//! process runs its own small tokio runtime; the supervisor is not
//! involved). With the managed redis-server, forkd must be running.

use std::io::{BufRead, IsTerminal};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use forkd_app::secrets;
use forkd_config::Config;
use forkd_store::{Store, StoreError, User};

use crate::cli::UserCommand;

pub(crate) fn run(config: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    // Validate arguments and read passwords before touching Redis.
    let password = match &cmd {
        UserCommand::Add {
            name,
            password_stdin,
            role,
            display_name,
        } => {
            check_name(name)?;
            check_role(role)?;
            if let Some(d) = display_name {
                check_display_name(d)?;
            }
            Some(read_password(*password_stdin)?)
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            check_name(name)?;
            Some(read_password(*password_stdin)?)
        }
        UserCommand::Del { name } | UserCommand::Revoke { name } => {
            check_name(name)?;
            None
        }
        UserCommand::List => None,
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let store = connect(config).await?;
        let cost = crate::settings::hash_cost(config);
        match cmd {
            UserCommand::Add {
                name,
                role,
                display_name,
                ..
            } => {
                let phc = hash(password.expect("read above"), cost).await?;
                let user = User {
                    display_name: display_name.unwrap_or_else(|| name.clone()),
                    name,
                    phc,
                    role,
                    created_at: now_unix(),
                    last_login: 0,
                    uid: secrets::new_uid(),
                    generation: 0,
                };
                store.add_user(&user).await?;
                outln!("user '{}' added (role {})", user.name, user.role);
            }
            UserCommand::Passwd { name, .. } => {
                existing(&store, &name).await?;
                let phc = hash(password.expect("read above"), cost).await?;
                // Every session of the old password is invalid from here
                // on; then they are removed.
                let uid = store.set_password(&name, &phc).await?;
                let n = store.remove_sessions(&uid).await?;
                store.forget_cached(&uid).await?;
                outln!("password of '{name}' changed; {n} session(s) ended");
            }
            UserCommand::Del { name } => {
                store
                    .delete_user(&name, config.auth.session_absolute_timeout)
                    .await?;
                outln!("user '{name}' deleted");
            }
            UserCommand::Revoke { name } => {
                existing(&store, &name).await?;
                let n = store.revoke(&name).await?;
                outln!("{n} session(s) of '{name}' ended");
            }
            UserCommand::List => list(&store).await?,
        }
        Ok(())
    })
}

/// The small runtime of a CLI command that talks to Redis.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")
}

pub(crate) async fn connect(config: &Config) -> anyhow::Result<Store> {
    let store = Store::new(&crate::settings::store_config(config))?;
    let wait = config.redis.connect_timeout + Duration::from_secs(2);
    if let Err(e) = store.connect_within(wait).await {
        let hint = if config.redis.url.is_empty() {
            " (forkd runs its own redis-server: is forkd running?)"
        } else {
            ""
        };
        bail!(
            "cannot reach Redis at {}{hint}: {e}",
            forkd_config::redact_url(&crate::settings::store_url(config))
        );
    }
    Ok(store)
}

async fn existing(store: &Store, name: &str) -> anyhow::Result<User> {
    store
        .user(name)
        .await?
        .ok_or_else(|| StoreError::NoSuchUser(name.to_owned()).into())
}

async fn hash(password: String, cost: secrets::HashCost) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || secrets::hash_password(&password, cost))
        .await?
        .map_err(anyhow::Error::msg)
}

async fn list(store: &Store) -> anyhow::Result<()> {
    let names = store.user_names().await?;
    outln!(
        "{:<24} {:<10} {:<24} {:<20} {:<20} {:>8}",
        "NAME",
        "ROLE",
        "DISPLAY NAME",
        "CREATED",
        "LAST LOGIN",
        "SESSIONS"
    );
    for name in names {
        let Some(u) = store.user(&name).await? else {
            continue;
        };
        let sessions = store.session_count(&u.uid).await?;
        outln!(
            "{:<24} {:<10} {:<24} {:<20} {:<20} {:>8}",
            u.name,
            u.role,
            u.display_name,
            date(u.created_at),
            if u.last_login == 0 {
                "never".to_owned()
            } else {
                date(u.last_login)
            },
            sessions
        );
    }
    Ok(())
}

fn date(unix: u64) -> String {
    jiff::Timestamp::from_second(unix as i64)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|_| unix.to_string())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// User names: 1 to 64 of letters, digits, '.', '_', '-', '@'.
fn check_name(name: &str) -> anyhow::Result<()> {
    if !forkd_store::valid_username(name) {
        bail!("invalid user name {name:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'");
    }
    Ok(())
}

fn check_role(role: &str) -> anyhow::Result<()> {
    let ok = (1..=32).contains(&role.len())
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
    if !ok {
        bail!("invalid role {role:?}: use 1 to 32 letters, digits, '_' or '-'");
    }
    Ok(())
}

fn check_display_name(d: &str) -> anyhow::Result<()> {
    if d.is_empty() || d.chars().count() > 128 || d.chars().any(char::is_control) {
        bail!("invalid display name: use 1 to 128 characters, no control characters");
    }
    Ok(())
}

fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    } else {
        if !std::io::stdin().is_terminal() {
            bail!("no terminal to ask for the password: use --password-stdin");
        }
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Password (again): ")?;
        if first != again {
            bail!("the passwords do not match");
        }
        first
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    if password.len() > 1024 {
        bail!("the password is longer than 1 KiB");
    }
    Ok(password)
}
