// SPDX-License-Identifier: Apache-2.0
//! Config files: `source --config PATH`, `backup --config PATH`, `check-config PATH`.
//!
//! A TOML file with a `[source]` and/or a `[backup]` table; each key is a long flag name of that
//! subcommand (`pair-id = "vm1"`, `heartbeat = "10ms"`), and `vmm = [...]` is the command after
//! `--` of `source`. Format, precedence and errors: `docs/config.md`.
//!
//! Nothing here knows a particular flag (but `check-config --keys`, which loads `psk-file`):
//! each key is looked up in the clap definition of the subcommand and its value goes through
//! that flag's own value parser, so a flag added later has its key at once and a bad value gets
//! the same words as on the command line. The file's keys then become arguments placed before
//! the command line's own, and clap parses the lot as usual (required flags, conflicts).

use std::any::TypeId;
use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Command, CommandFactory, FromArgMatches};
use toml_edit::{Document, Item, Value};

use crate::cli::Cli;

/// The subcommands that take `--config`; each reads the table of its own name.
pub const ROLES: [&str; 2] = ["source", "backup"];

/// The id (and long name) of the `--config` flag.
const CONFIG_ARG: &str = "config";

/// Why a config file was refused. Every variant names the file; those about one key name the
/// key and its line. All are usage errors (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// From `fs::read_to_string`.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path} line {line}, column {column}: not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based.
        line: usize,
        /// 1-based, in characters.
        column: usize,
        /// From the TOML parser.
        message: String,
    },
    /// A key is unknown, or its value has the wrong type or is refused by the flag's parser.
    #[error("{path} line {line}: key `{key}`: {message}")]
    Key {
        /// The file.
        path: String,
        /// 1-based.
        line: usize,
        /// The key as written (`table.key` outside the role tables).
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A table as a whole is incomplete (a required key is missing).
    #[error("{path} line {line}: table [{table}]: {message}")]
    Table {
        /// The file.
        path: String,
        /// 1-based; the table's header.
        line: usize,
        /// `source` or `backup`.
        table: String,
        /// What is missing.
        message: String,
    },
    /// `ROLE --config FILE` and the file has no table for ROLE.
    #[error("{path}: no [{table}] table (the file has {found}); `vmm-takeover {table} --config` reads [{table}]")]
    MissingTable {
        /// The file.
        path: String,
        /// The table looked for.
        table: String,
        /// The tables the file has, for the message.
        found: String,
    },
    /// `check-config FILE` and the file has no table at all.
    #[error("{path}: no [source] or [backup] table: nothing to check")]
    Empty {
        /// The file.
        path: String,
    },
}

/// Why the command line (with its config file) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// From clap, about the command line itself (also `--help` and `--version`, which are not
    /// errors: `clap::Error::exit` prints them on stdout and exits 0).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// About the config file.
    #[error(transparent)]
    Config(#[from] Error),
}

/// The whole command line: [`Cli`] with `--config` on each of [`ROLES`], built (so that global
/// flags such as `--log-level` are known to the subcommands, and have keys too).
pub fn command() -> Command {
    // In place (`mut_subcommand` would move them to the end of man pages and completions).
    let mut cmd = Cli::command().mut_subcommands(|c| {
        let role = c.get_name().to_string();
        if !ROLES.contains(&role.as_str()) {
            return c;
        }
        c.arg(
            Arg::new(CONFIG_ARG)
                .long(CONFIG_ARG)
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf))
                .display_order(0)
                .help(format!(
                    "Read flags from the [{role}] table of this TOML file (keys are the long \
                     flag names); flags given here override it. See docs/config.md"
                )),
        )
    });
    cmd.build();
    cmd
}

/// Parses the command line; with `source|backup --config FILE`, the file's table first.
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Cli, ParseError> {
    let cmd = command();
    let argv: Vec<OsString> = argv.into_iter().collect();
    let Some(at) = find_config(&cmd, &argv) else {
        let m = cmd.try_get_matches_from(argv)?;
        return Ok(Cli::from_arg_matches(&m)?);
    };
    let role = argv[at.sub].to_string_lossy().into_owned();
    let sub = cmd
        .find_subcommand(&role)
        .expect("find_config returns a subcommand");
    let rest = &argv[at.sub + 1..];
    let dashdash = rest.iter().position(|a| a == "--");
    // Global flags (`--log-level`) may stand before the subcommand too.
    let mut given = given_on_command_line(sub, &argv[1..at.sub]);
    given.extend(given_on_command_line(
        sub,
        &rest[..dashdash.unwrap_or(rest.len())],
    ));
    // `--help` shows the help even with a broken file.
    let help = given.iter().any(|g| {
        matches!(
            find_arg(sub, g).get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong
        )
    });
    if help {
        let m = cmd.try_get_matches_from(argv)?;
        return Ok(Cli::from_arg_matches(&m)?);
    }
    let file = ConfigFile::load(Path::new(&at.path))?;
    let table = file.table_args(sub, &role)?;

    // The command line wins: drop the file's keys that it gives, or that conflict with one it
    // gives (`--insecure-no-auth` on the command line replaces the file's `psk-file`).
    let kept: Vec<&Entry> = table
        .entries
        .iter()
        .filter(|e| {
            let a = find_arg(sub, &e.id);
            !given
                .iter()
                .any(|g| *g == e.id || conflict(sub, a, find_arg(sub, g)))
        })
        .collect();

    let mut full: Vec<OsString> = argv[..=at.sub].to_vec();
    full.extend(kept.iter().flat_map(|e| e.tokens.iter().cloned()));
    full.extend(rest.iter().cloned());
    // The file's trailing command (`vmm`), unless the command line has a `--` of its own.
    if dashdash.is_none() && !table.trailing.is_empty() {
        full.push("--".into());
        full.extend(table.trailing.iter().cloned());
    }
    let m = cmd
        .clone()
        .try_get_matches_from(full)
        .map_err(|e| file.clap_error(e, &role, &table, &kept))?;
    Ok(Cli::from_arg_matches(&m)?)
}

/// What `check-config` found: the tables checked, in file order.
#[derive(Debug)]
pub struct Checked {
    /// `source`, `backup`.
    pub tables: Vec<&'static str>,
}

/// `check-config`: every table of the file, with the same checks as at start (required keys,
/// conflicts); with `keys`, also loads each `psk-file`.
pub fn check(path: &Path, keys: bool) -> Result<Checked, ParseError> {
    let cmd = command();
    let file = ConfigFile::load(path)?;
    let tables = file.roles()?;
    if tables.is_empty() {
        return Err(Error::Empty {
            path: file.path.clone(),
        }
        .into());
    }
    for role in &tables {
        let sub = cmd.find_subcommand(role).expect("roles are subcommands");
        let table = file.table_args(sub, role)?;
        let all: Vec<&Entry> = table.entries.iter().collect();
        let mut argv: Vec<OsString> = vec!["vmm-takeover".into(), (*role).into()];
        argv.extend(all.iter().flat_map(|e| e.tokens.iter().cloned()));
        if !table.trailing.is_empty() {
            argv.push("--".into());
            argv.extend(table.trailing.iter().cloned());
        }
        let m = cmd
            .clone()
            .try_get_matches_from(argv)
            .map_err(|e| file.clap_error(e, role, &table, &all))?;
        let cli = Cli::from_arg_matches(&m)?;
        if keys {
            file.check_key_file(&cli, &table)?;
        }
    }
    Ok(Checked { tables })
}

/// Where `--config` is: the index of the subcommand in argv and the (last) path given.
struct ConfigAt {
    sub: usize,
    path: OsString,
}

/// Finds `ROLE ... --config PATH` (or `--config=PATH`) before any `--`. A malformed `--config`
/// (no value) is left to clap, which then reports it.
fn find_config(cmd: &Command, argv: &[OsString]) -> Option<ConfigAt> {
    // Skip the options before the subcommand (`--log-level info source ...`).
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_str()?;
        if a == "--" {
            return None;
        }
        match a.strip_prefix("--") {
            Some(name) if !name.contains('=') => {
                let takes = cmd
                    .get_arguments()
                    .find(|x| x.get_long() == Some(name))
                    .is_some_and(|x| x.get_action().takes_values());
                i += if takes { 2 } else { 1 };
            }
            Some(_) => i += 1,
            None if a.starts_with('-') => i += 1,
            None => break,
        }
    }
    let sub = i;
    let role = argv.get(sub)?.to_str()?;
    if !ROLES.contains(&role) {
        return None;
    }
    let mut path = None;
    let mut j = sub + 1;
    while j < argv.len() {
        let a = argv[j].as_os_str();
        if a == "--" {
            break;
        }
        if a == "--config" {
            path = Some(argv.get(j + 1)?.clone());
            j += 2;
            continue;
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            path = Some(p.into());
        }
        j += 1;
    }
    path.map(|path| ConfigAt { sub, path })
}

/// The ids of the subcommand's flags that appear in `args` (the command line after the
/// subcommand, before `--`).
fn given_on_command_line(sub: &Command, args: &[OsString]) -> Vec<String> {
    let mut ids = Vec::new();
    for a in args.iter().filter_map(|a| a.to_str()) {
        if let Some(long) = a.strip_prefix("--") {
            let name = long.split_once('=').map_or(long, |(n, _)| n);
            if let Some(arg) = sub.get_arguments().find(|x| {
                x.get_long_and_visible_aliases()
                    .is_some_and(|l| l.contains(&name))
            }) {
                ids.push(arg.get_id().to_string());
            }
        } else if let Some(shorts) = a.strip_prefix('-') {
            for c in shorts.chars() {
                let Some(arg) = sub.get_arguments().find(|x| x.get_short() == Some(c)) else {
                    break;
                };
                ids.push(arg.get_id().to_string());
                if arg.get_action().takes_values() {
                    break;
                }
            }
        }
    }
    ids
}

fn find_arg<'a>(sub: &'a Command, id: &str) -> &'a Arg {
    sub.get_arguments()
        .find(|a| a.get_id() == id)
        .expect("ids come from the same command")
}

/// Whether two flags cannot be given together: a `conflicts_with` either way, or both in a group
/// that takes one of its flags at most.
fn conflict(sub: &Command, a: &Arg, b: &Arg) -> bool {
    let names = |x: &Arg, y: &Arg| {
        sub.get_arg_conflicts_with(x)
            .iter()
            .any(|c| c.get_id() == y.get_id())
    };
    names(a, b)
        || names(b, a)
        || sub.get_groups().any(|g| {
            !g.clone().is_multiple()
                && g.get_args().any(|i| i == a.get_id())
                && g.get_args().any(|i| i == b.get_id())
        })
}

/// The key of a flag: its long name; for a positional (`vmm`), its id in kebab case.
fn key_of(arg: &Arg) -> String {
    arg.get_long()
        .map(str::to_string)
        .unwrap_or_else(|| arg.get_id().as_str().replace('_', "-"))
}

/// The flags a config file may set: all but `--config` itself, `--help`, `--version`, and
/// positionals other than the trailing one (the subcommands have none today).
fn configurable(sub: &Command) -> impl Iterator<Item = &Arg> {
    sub.get_arguments().filter(|a| {
        a.get_id() != CONFIG_ARG
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
            && (!a.is_positional() || a.is_last_set())
    })
}

/// One key of a table, as command-line arguments.
#[derive(Debug)]
struct Entry {
    /// The flag's clap id.
    id: String,
    /// The key as written.
    key: String,
    /// Where the key is.
    line: usize,
    /// `--long=value` (once per value), `--long` for `true`, nothing for `false`.
    tokens: Vec<OsString>,
}

/// One role's table, as command-line arguments.
#[derive(Debug)]
struct TableArgs {
    /// The line of the table's header.
    line: usize,
    /// The flags, in file order.
    entries: Vec<Entry>,
    /// The trailing positional's values (`vmm`), to go after `--`.
    trailing: Vec<OsString>,
}

/// A parsed config file.
struct ConfigFile {
    /// For messages.
    path: String,
    /// Keeps the spans of keys and values, for line numbers.
    doc: Document<String>,
}

impl ConfigFile {
    fn load(path: &Path) -> Result<ConfigFile, Error> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: shown.clone(),
            source,
        })?;
        ConfigFile::parse(shown, text)
    }

    fn parse(path: String, text: String) -> Result<ConfigFile, Error> {
        // The parser gives back neither document nor text on error: keep a copy for the line.
        match Document::parse(text.clone()) {
            Ok(doc) => Ok(ConfigFile { path, doc }),
            Err(e) => {
                let at = e.span().map_or(0, |s| s.start).min(text.len());
                let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                Err(Error::Syntax {
                    line: line_of(&text, at),
                    column: text[line_start..at].chars().count() + 1,
                    message: e.message().to_string(),
                    path,
                })
            }
        }
    }

    /// The 1-based line of a byte offset (line 1 when the parser kept no span).
    fn line(&self, span: Option<Range<usize>>) -> usize {
        line_of(self.doc.raw(), span.map_or(0, |s| s.start))
    }

    fn key_error(&self, line: usize, key: &str, message: impl Into<String>) -> Error {
        Error::Key {
            path: self.path.clone(),
            line,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The role tables of the file, in file order; anything else at the top is an error.
    fn roles(&self) -> Result<Vec<&'static str>, Error> {
        let root = self.doc.as_table();
        let mut roles = Vec::new();
        for (k, item) in root.iter() {
            let line = self.line(root.key(k).and_then(|k| k.span()));
            let Some(role) = ROLES.iter().find(|r| **r == k) else {
                let message = if item.is_table_like() {
                    "unknown table; allowed: [source], [backup]".to_string()
                } else {
                    "keys belong in a table: [source] or [backup]".to_string()
                };
                return Err(self.key_error(line, k, message));
            };
            if !item.is_table_like() {
                return Err(self.key_error(
                    line,
                    k,
                    format!("must be a table ([{k}]), got {}", type_name(item)),
                ));
            }
            roles.push(*role);
        }
        Ok(roles)
    }

    /// Table `role` as arguments of subcommand `sub`: every key known, every value of the right
    /// type and accepted by its flag's value parser.
    fn table_args(&self, sub: &Command, role: &str) -> Result<TableArgs, Error> {
        let roles = self.roles()?;
        let root = self.doc.as_table();
        let Some(item) = root.get(role) else {
            let found = if roles.is_empty() {
                "no table".to_string()
            } else {
                roles
                    .iter()
                    .map(|r| format!("[{r}]"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(Error::MissingTable {
                path: self.path.clone(),
                table: role.to_string(),
                found,
            });
        };
        let table = item.as_table_like().expect("roles() checked it");
        let header = match item {
            Item::Table(t) => t.span(),
            Item::Value(v) => v.span(),
            _ => None,
        }
        .or_else(|| root.key(role).and_then(|k| k.span()));
        let mut out = TableArgs {
            line: self.line(header),
            entries: Vec::new(),
            trailing: Vec::new(),
        };
        for (k, v) in table.iter() {
            let line = self.line(table.key(k).and_then(|k| k.span()));
            let Some(arg) = configurable(sub).find(|a| key_of(a) == k) else {
                return Err(self.key_error(line, k, unknown_key(sub, role, k)));
            };
            let vline = self.line(v.span()).max(line);
            let values = self.values(sub, arg, k, v, vline)?;
            if arg.is_positional() {
                out.trailing = values;
                continue;
            }
            let long = arg
                .get_long()
                .expect("non-positional flags have a long name");
            let tokens = if arg.get_action().takes_values() {
                values
                    .iter()
                    .map(|v| {
                        let mut t = OsString::from(format!("--{long}="));
                        t.push(v);
                        t
                    })
                    .collect()
            } else {
                // A flag without value: `values` holds how many times to give it.
                values.iter().map(|_| format!("--{long}").into()).collect()
            };
            out.entries.push(Entry {
                id: arg.get_id().to_string(),
                key: k.to_string(),
                line,
                tokens,
            });
        }
        Ok(out)
    }

    /// The command-line values of one key (for a flag without value: one empty value per time
    /// the flag is given).
    fn values(
        &self,
        sub: &Command,
        arg: &Arg,
        key: &str,
        item: &Item,
        line: usize,
    ) -> Result<Vec<OsString>, Error> {
        let err = |m: String| self.key_error(line, key, m);
        let value = item.as_value();
        if !arg.get_action().takes_values() {
            return match (arg.get_action(), value) {
                (ArgAction::SetTrue, Some(Value::Boolean(b))) => Ok(if *b.value() {
                    vec![OsString::new()]
                } else {
                    vec![]
                }),
                (ArgAction::SetFalse, Some(Value::Boolean(b))) => Ok(if *b.value() {
                    vec![]
                } else {
                    vec![OsString::new()]
                }),
                (ArgAction::Count, Some(Value::Integer(n))) => match u8::try_from(*n.value()) {
                    Ok(n) => Ok(vec![OsString::new(); n.into()]),
                    Err(_) => Err(err(format!("expected 0..=255, got {}", n.value()))),
                },
                (ArgAction::Count, _) => Err(err(format!(
                    "expected a whole number, got {}",
                    type_name(item)
                ))),
                _ => Err(err(format!(
                    "expected true or false, got {}",
                    type_name(item)
                ))),
            };
        }
        let many = matches!(arg.get_action(), ArgAction::Append)
            || arg.get_num_args().is_some_and(|r| r.max_values() > 1);
        let scalars: Vec<&Value> = if many {
            match value {
                Some(Value::Array(a)) => a.iter().collect(),
                _ => {
                    return Err(err(format!(
                        "expected an array of {}, got {}",
                        expected(arg, true),
                        type_name(item)
                    )))
                }
            }
        } else {
            match value {
                Some(v) if !matches!(v, Value::Array(_) | Value::InlineTable(_)) => vec![v],
                _ => {
                    return Err(err(format!(
                        "expected {}, got {}",
                        expected(arg, false),
                        type_name(item)
                    )))
                }
            }
        };
        let integer = is_integer(arg);
        let mut out = Vec::with_capacity(scalars.len());
        for v in scalars {
            let s = match v {
                Value::Integer(n) if integer => n.value().to_string(),
                Value::String(s) if !integer => s.value().clone(),
                _ => {
                    return Err(err(format!(
                        "expected {}, got {}",
                        expected(arg, many),
                        value_type_name(v)
                    )))
                }
            };
            run_value_parser(sub, arg, key, &s).map_err(|e| err(clap_message(&e)))?;
            out.push(s.into());
        }
        Ok(out)
    }

    /// A clap error about the arguments made from the file: a missing required key or two keys
    /// that conflict are told in keys and lines; anything else is clap's own (it is then about
    /// the command line).
    fn clap_error(
        &self,
        e: clap::Error,
        role: &str,
        table: &TableArgs,
        kept: &[&Entry],
    ) -> ParseError {
        let strings = |k: ContextKind| -> Vec<String> {
            match e.get(k) {
                Some(ContextValue::String(s)) => vec![s.clone()],
                Some(ContextValue::Strings(v)) => v.clone(),
                _ => Vec::new(),
            }
        };
        let entry = |long: &str| {
            kept.iter()
                .find(|en| en.tokens.iter().any(|t| is_flag(t, long)))
        };
        match e.kind() {
            ErrorKind::MissingRequiredArgument => {
                let missing: Vec<String> = strings(ContextKind::InvalidArg)
                    .iter()
                    .map(|s| {
                        let keys: Vec<String> = longs(s).iter().map(|l| format!("`{l}`")).collect();
                        match keys.len() {
                            1 => keys[0].clone(),
                            _ => format!("one of {}", keys.join(", ")),
                        }
                    })
                    .collect();
                Error::Table {
                    path: self.path.clone(),
                    line: table.line,
                    table: role.to_string(),
                    message: format!(
                        "missing required key: {} (in the file or as a flag)",
                        missing.join("; ")
                    ),
                }
                .into()
            }
            ErrorKind::ArgumentConflict => {
                let this = strings(ContextKind::InvalidArg);
                let prior = strings(ContextKind::PriorArg);
                let this = this.iter().flat_map(|s| longs(s)).next();
                let prior: Vec<String> = prior.iter().flat_map(|s| longs(s)).collect();
                let describe = |l: &str| match entry(l) {
                    Some(en) => format!("key `{}` (line {})", en.key, en.line),
                    None => format!("flag --{l}"),
                };
                match this.as_deref().and_then(entry) {
                    Some(en) => {
                        let others: Vec<String> = prior.iter().map(|p| describe(p)).collect();
                        self.key_error(
                            en.line,
                            &en.key,
                            format!("cannot be used with {}", others.join(", ")),
                        )
                        .into()
                    }
                    None => e.into(),
                }
            }
            _ => e.into(),
        }
    }

    /// Loads the `psk-file` of a checked table (the checks made at start: format, mode, owner).
    fn check_key_file(&self, cli: &Cli, table: &TableArgs) -> Result<(), Error> {
        let auth = match &cli.command {
            crate::cli::Command::Source(a) => &a.auth,
            crate::cli::Command::Backup(a) => &a.auth,
            _ => return Ok(()),
        };
        let Some(path) = &auth.psk_file else {
            return Ok(());
        };
        let line = table
            .entries
            .iter()
            .find(|e| e.id == "psk_file")
            .map_or(table.line, |e| e.line);
        vmm_takeover_core::auth::KeyRing::load(path)
            .map(drop)
            .map_err(|e| self.key_error(line, "psk-file", e.to_string()))
    }
}

/// Runs the flag's own value parser on `value`, so that the error says what it says for the
/// flag. (clap keeps `ValueParser::parse_ref` to itself: a command of this one flag, without the
/// flag's relations to others, parses it instead.)
fn run_value_parser(sub: &Command, arg: &Arg, key: &str, value: &str) -> Result<(), clap::Error> {
    let long = arg.get_long().unwrap_or(key).to_string();
    let mut one = Arg::new(arg.get_id().to_string())
        .long(long.clone())
        .action(ArgAction::Set)
        .num_args(1)
        .allow_hyphen_values(true)
        .value_parser(arg.get_value_parser().clone());
    if let Some(names) = arg.get_value_names() {
        one = one.value_names(names.to_vec());
    }
    Command::new(sub.get_name().to_string())
        .no_binary_name(true)
        .arg(one)
        .try_get_matches_from([format!("--{long}={value}")])
        .map(drop)
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Whether `token` (`--long` or `--long=value`) gives flag `long`.
fn is_flag(token: &OsStr, long: &str) -> bool {
    let Some(t) = token.to_str().and_then(|t| t.strip_prefix("--")) else {
        return false;
    };
    t == long || t.strip_prefix(long).is_some_and(|r| r.starts_with('='))
}

/// The long flag names in a clap rendering such as `<--psk-file <PATH>|--insecure-no-auth>`;
/// a positional's `<VMM_COMMAND>` is not one (none is required today).
fn longs(s: &str) -> Vec<String> {
    s.split("--")
        .skip(1)
        .map(|p| {
            p.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// The message of a value parser's error, on one line, without clap's `error: ` and hints.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.trim_start_matches("error: ");
    let text = text
        .split("\n\nFor more information")
        .next()
        .unwrap_or(text);
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The message for an unknown key: what is allowed, and the likely intended key.
fn unknown_key(sub: &Command, role: &str, key: &str) -> String {
    let keys: Vec<String> = configurable(sub).map(key_of).collect();
    let kebab = key.replace('_', "-").to_ascii_lowercase();
    let hint = if kebab != key && keys.contains(&kebab) {
        format!(" (did you mean `{kebab}`?)")
    } else if key == CONFIG_ARG {
        " (a config file cannot name another)".to_string()
    } else {
        String::new()
    };
    format!(
        "unknown key in [{role}]{hint}; allowed: {}",
        keys.join(", ")
    )
}

/// Whether the flag's value parser makes an integer: then the key takes a TOML integer.
fn is_integer(arg: &Arg) -> bool {
    let t = arg.get_value_parser().type_id();
    [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i8>(),
        TypeId::of::<i16>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<isize>(),
    ]
    .iter()
    .any(|i| t == *i)
}

/// What a key's value must be, e.g. ``a string (`HOST:PORT`)``.
fn expected(arg: &Arg, plural: bool) -> String {
    let name = arg
        .get_value_names()
        .and_then(|n| n.first())
        .map(|n| format!(" (`{n}`)"))
        .unwrap_or_default();
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .map(|p| format!("\"{}\"", p.get_name()))
        .collect();
    match (is_integer(arg), plural) {
        (true, false) => format!("a whole number{name}"),
        (true, true) => format!("whole numbers{name}"),
        _ if !possible.is_empty() => format!("one of the strings {}", possible.join(", ")),
        (false, false) => format!("a string{name}"),
        (false, true) => format!("strings{name}"),
    }
}

fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(v) => value_type_name(v),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

fn value_type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample value for every key: (role, key, TOML value, the same as flags). Each group
    /// of keys that may stand together is one variant.
    const SAMPLES: &[(&str, usize, &str, &str, &[&str])] = &[
        (
            "source",
            0,
            "listen",
            r#""127.0.0.1:7070""#,
            &["--listen", "127.0.0.1:7070"],
        ),
        ("source", 0, "pair-id", r#""vm1""#, &["--pair-id", "vm1"]),
        (
            "source",
            0,
            "keepalive",
            r#""2:1:3""#,
            &["--keepalive", "2:1:3"],
        ),
        (
            "source",
            0,
            "arbiter",
            r#""etcd://127.0.0.1:2379""#,
            &["--arbiter", "etcd://127.0.0.1:2379"],
        ),
        ("source", 0, "lease-ttl", r#""3s""#, &["--lease-ttl", "3s"]),
        (
            "source",
            0,
            "psk-file",
            r#""/etc/vmm-takeover/vm1.psk""#,
            &["--psk-file", "/etc/vmm-takeover/vm1.psk"],
        ),
        ("source", 0, "max-pending", "10", &["--max-pending", "10"]),
        (
            "source",
            0,
            "max-pending-per-addr",
            "2",
            &["--max-pending-per-addr", "2"],
        ),
        (
            "source",
            0,
            "user-timeout",
            r#""3s""#,
            &["--user-timeout", "3s"],
        ),
        (
            "source",
            0,
            "heartbeat",
            r#""10ms""#,
            &["--heartbeat", "10ms"],
        ),
        (
            "source",
            0,
            "on-handoff",
            r#""virsh suspend vm1""#,
            &["--on-handoff", "virsh suspend vm1"],
        ),
        (
            "source",
            0,
            "on-resume",
            r#""virsh resume vm1""#,
            &["--on-resume", "virsh resume vm1"],
        ),
        (
            "source",
            0,
            "hook-timeout",
            r#""5s""#,
            &["--hook-timeout", "5s"],
        ),
        (
            "source",
            0,
            "handoff-timeout",
            r#""60s""#,
            &["--handoff-timeout", "60s"],
        ),
        (
            "source",
            0,
            "log-level",
            r#""debug""#,
            &["--log-level", "debug"],
        ),
        ("source", 0, "vmm", r#"["sleep", "--", "1"]"#, &[]),
        (
            "source",
            1,
            "insecure-no-auth",
            "true",
            &["--insecure-no-auth"],
        ),
        (
            "source",
            1,
            "qmp",
            r#""/run/qmp.sock""#,
            &["--qmp", "/run/qmp.sock"],
        ),
        (
            "source",
            1,
            "health-interval",
            r#""2s""#,
            &["--health-interval", "2s"],
        ),
        (
            "source",
            1,
            "migrate-to",
            r#""tcp:192.0.2.20:4444""#,
            &["--migrate-to", "tcp:192.0.2.20:4444"],
        ),
        (
            "source",
            0,
            "metrics",
            r#""127.0.0.1:9465""#,
            &["--metrics", "127.0.0.1:9465"],
        ),
        (
            "source",
            0,
            "control",
            r#""/run/vmm-takeover/vm1.sock""#,
            &["--control", "/run/vmm-takeover/vm1.sock"],
        ),
        (
            "backup",
            0,
            "metrics",
            r#""[::1]:9466""#,
            &["--metrics", "[::1]:9466"],
        ),
        (
            "backup",
            0,
            "control",
            r#""/run/vmm-takeover/vm1-backup.sock""#,
            &["--control", "/run/vmm-takeover/vm1-backup.sock"],
        ),
        (
            "source",
            2,
            "insecure-no-auth",
            "true",
            &["--insecure-no-auth"],
        ),
        ("source", 2, "vm", r#""kvm-dummy""#, &["--vm", "kvm-dummy"]),
        (
            "source",
            2,
            "checkpoint",
            r#""25ms""#,
            &["--checkpoint", "25ms"],
        ),
        (
            "source",
            2,
            "replica-listen",
            r#""127.0.0.1:7072""#,
            &["--replica-listen", "127.0.0.1:7072"],
        ),
        (
            "source",
            2,
            "guest-mem",
            r#""64MiB""#,
            &["--guest-mem", "64MiB"],
        ),
        (
            "source",
            2,
            "guest-dirty-rate",
            r#""10MiB/s""#,
            &["--guest-dirty-rate", "10MiB/s"],
        ),
        (
            "backup",
            0,
            "connect",
            r#""[::1]:7070""#,
            &["--connect", "[::1]:7070"],
        ),
        ("backup", 0, "pair-id", r#""vm1""#, &["--pair-id", "vm1"]),
        (
            "backup",
            0,
            "keepalive",
            r#""off""#,
            &["--keepalive", "off"],
        ),
        (
            "backup",
            0,
            "arbiter",
            r#""etcd://127.0.0.1:2379""#,
            &["--arbiter", "etcd://127.0.0.1:2379"],
        ),
        ("backup", 0, "lease-ttl", r#""3s""#, &["--lease-ttl", "3s"]),
        (
            "backup",
            0,
            "psk-file",
            r#""/k.psk""#,
            &["--psk-file", "/k.psk"],
        ),
        (
            "backup",
            0,
            "heartbeat-misses",
            "5",
            &["--heartbeat-misses", "5"],
        ),
        (
            "backup",
            0,
            "kernel-keepalive-only",
            "true",
            &["--kernel-keepalive-only"],
        ),
        ("backup", 0, "retry-rejected", "true", &["--retry-rejected"]),
        (
            "backup",
            0,
            "on-takeover",
            r#""echo up""#,
            &["--on-takeover", "echo up"],
        ),
        (
            "backup",
            0,
            "hook-timeout",
            r#""1m""#,
            &["--hook-timeout", "1m"],
        ),
        (
            "backup",
            0,
            "log-level",
            r#""trace""#,
            &["--log-level", "trace"],
        ),
        (
            "backup",
            1,
            "insecure-no-auth",
            "true",
            &["--insecure-no-auth"],
        ),
        (
            "backup",
            1,
            "qmp",
            r#""/run/qmp.sock""#,
            &["--qmp", "/run/qmp.sock"],
        ),
        (
            "backup",
            2,
            "insecure-no-auth",
            "true",
            &["--insecure-no-auth"],
        ),
        ("backup", 2, "vm", r#""kvm-dummy""#, &["--vm", "kvm-dummy"]),
        (
            "backup",
            2,
            "then-listen",
            r#""127.0.0.1:7071""#,
            &["--then-listen", "127.0.0.1:7071"],
        ),
        (
            "backup",
            2,
            "then-heartbeat",
            r#""20ms""#,
            &["--then-heartbeat", "20ms"],
        ),
        (
            "backup",
            2,
            "replica-from",
            r#""127.0.0.1:7072""#,
            &["--replica-from", "127.0.0.1:7072"],
        ),
        (
            "backup",
            2,
            "guest-mem",
            r#""64MiB""#,
            &["--guest-mem", "64MiB"],
        ),
        (
            "backup",
            2,
            "guest-dirty-rate",
            r#""1MiB/s""#,
            &["--guest-dirty-rate", "1MiB/s"],
        ),
        (
            "backup",
            2,
            "then-checkpoint",
            r#""50ms""#,
            &["--then-checkpoint", "50ms"],
        ),
        (
            "backup",
            2,
            "then-replica-listen",
            r#""127.0.0.1:7073""#,
            &["--then-replica-listen", "127.0.0.1:7073"],
        ),
    ];

    /// A scratch file, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(text: &str) -> Scratch {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!(
                "vmm-takeover-config-unit-{}-{n}.toml",
                std::process::id()
            ));
            std::fs::write(&p, text).unwrap();
            Scratch(p)
        }
        fn arg(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn parse_strs(args: &[&str]) -> Result<Cli, ParseError> {
        parse(
            std::iter::once("vmm-takeover")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    fn err(args: &[&str]) -> String {
        match parse_strs(args) {
            Ok(c) => panic!("{args:?} parsed: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Each variant's keys from a file parse to exactly what the same flags do, and the
    /// samples cover every key there is (a new flag fails here until it has a sample).
    #[test]
    fn every_key_parses_like_its_flag() {
        let cmd = command();
        for role in ROLES {
            let sub = cmd.find_subcommand(role).unwrap();
            let mut missing: Vec<String> = configurable(sub)
                .map(key_of)
                .filter(|k| !SAMPLES.iter().any(|s| s.0 == role && s.2 == k))
                .collect();
            missing.sort();
            assert!(
                missing.is_empty(),
                "no sample for [{role}] keys {missing:?}"
            );
            for variant in 0..3 {
                let mut toml = format!("[{role}]\n");
                let mut flags = vec![role.to_string()];
                let mut tail = Vec::new();
                // A variant other than 0 takes the identity of variant 0 (address, pair id).
                for s in SAMPLES.iter().filter(|s| {
                    s.0 == role
                        && (s.1 == variant
                            || (s.1 == 0 && ["listen", "connect", "pair-id"].contains(&s.2)))
                }) {
                    toml.push_str(&format!("{} = {}\n", s.2, s.3));
                    flags.extend(s.4.iter().map(|f| f.to_string()));
                    if s.2 == "vmm" {
                        tail = vec!["--", "sleep", "--", "1"];
                    }
                }
                flags.extend(tail.iter().map(|t| t.to_string()));
                let f = Scratch::new(&toml);
                let from_file = parse_strs(&[role, "--config", &f.arg()])
                    .unwrap_or_else(|e| panic!("{toml}: {e}"));
                let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                let from_flags = parse_strs(&flags).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
                assert_eq!(
                    format!("{from_file:?}"),
                    format!("{from_flags:?}"),
                    "{toml}"
                );
                check(&f.0, false).unwrap_or_else(|e| panic!("{toml}: {e}"));
            }
        }
    }

    #[test]
    fn the_command_line_wins() {
        let f = Scratch::new(
            "[source]\nlisten = \"127.0.0.1:1\"\npair-id = \"a\"\npsk-file = \"/k\"\n\
             heartbeat = \"10ms\"\nvmm = [\"sleep\", \"1\"]\nlog-level = \"debug\"\n",
        );
        let c = parse_strs(&[
            "--log-level=warn",
            "source",
            "--listen",
            "127.0.0.1:2",
            "--config",
            &f.arg(),
            "--insecure-no-auth",
            "--",
        ])
        .unwrap();
        assert_eq!(c.log_level, Some(crate::cli::LogLevel::Warn));
        let crate::cli::Command::Source(a) = c.command else {
            panic!("{c:?}")
        };
        assert_eq!(a.listen, "127.0.0.1:2".parse().unwrap());
        // The file's value where the command line says nothing.
        assert_eq!(a.heartbeat, Some(std::time::Duration::from_millis(10)));
        // --insecure-no-auth replaces the file's psk-file instead of conflicting with it.
        assert!(a.auth.insecure_no_auth && a.auth.psk_file.is_none());
        // A bare `--` clears the file's command.
        assert!(a.vmm.is_empty());
    }

    #[test]
    fn false_omits_a_flag_and_twice_on_the_command_line_is_still_an_error() {
        let f = Scratch::new(
            "[backup]\nconnect = \"127.0.0.1:1\"\npair-id = \"a\"\ninsecure-no-auth = true\n\
             retry-rejected = false\n",
        );
        let c = parse_strs(&["backup", "--config", &f.arg()]).unwrap();
        let crate::cli::Command::Backup(a) = c.command else {
            panic!("{c:?}")
        };
        assert!(!a.retry_rejected);
        let e = err(&[
            "backup",
            "--config",
            &f.arg(),
            "--pair-id",
            "b",
            "--pair-id",
            "c",
        ]);
        assert!(e.contains("--pair-id"), "{e}");
    }

    #[test]
    fn errors_name_file_key_line_and_what_is_allowed() {
        let cases: &[(&str, &[&str])] = &[
            ("[source]\n\nlisten = 7070\n", &["line 3", "key `listen`", "a string (`HOST:PORT`)", "an integer"]),
            ("[source]\nheartbeat = \"soon\"\n", &["line 2", "key `heartbeat`", "is not a duration like 10ms"]),
            ("[source]\nmax-pending = 0\n", &["line 2", "key `max-pending`", "1..=65536"]),
            ("[source]\nlisten = \"nowhere\"\n", &["line 2", "key `listen`", "expected HOST:PORT"]),
            ("[source]\npair_id = \"a\"\n", &["line 2", "key `pair_id`", "did you mean `pair-id`", "allowed: listen,"]),
            ("[source]\nvm = \"qemu\"\n", &["line 2", "key `vm`", "kvm-dummy, simulated"]),
            ("[source]\nvmm = \"qemu -m 1\"\n", &["line 2", "key `vmm`", "an array of strings"]),
            ("[source]\nlisten = \"127.0.0.1:1\"\n", &["line 1", "table [source]", "missing required key", "one of `psk-file`, `insecure-no-auth`", "`pair-id`"]),
            ("[source]\nlisten = \"127.0.0.1:1\"\npair-id = \"a\"\ninsecure-no-auth = true\npsk-file = \"/k\"\n", &["line 4", "key `insecure-no-auth`", "cannot be used with key `psk-file` (line 5)"]),
            ("[backup]\nconnect = \"127.0.0.1:1\"\n", &["no [source] table", "has [backup]"]),
            ("[source]\nlisten = \"127.0.0.1:1\n", &["line 2, column", "not valid TOML"]),
            ("[sorce]\n", &["line 1", "key `sorce`", "allowed: [source], [backup]"]),
        ];
        for (toml, wanted) in cases {
            let f = Scratch::new(toml);
            let e = err(&["source", "--config", &f.arg()]);
            assert!(e.contains(&f.arg()), "{toml}: {e}");
            for w in *wanted {
                assert!(e.contains(w), "{toml}: {e:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn config_is_found_where_clap_would_take_it() {
        let cmd = command();
        let at = |args: &[&str]| {
            let v: Vec<OsString> = args.iter().map(OsString::from).collect();
            find_config(&cmd, &v).map(|a| (a.sub, a.path.into_string().unwrap()))
        };
        assert_eq!(at(&["x", "source", "--config", "a"]), Some((1, "a".into())));
        assert_eq!(
            at(&["x", "--log-level", "info", "backup", "--config=b"]),
            Some((3, "b".into()))
        );
        assert_eq!(
            at(&["x", "source", "--config", "a", "--config", "c"]),
            Some((1, "c".into()))
        );
        assert_eq!(at(&["x", "source", "--", "--config", "a"]), None);
        assert_eq!(at(&["x", "demo", "--config", "a"]), None);
        assert_eq!(at(&["x", "source", "--config"]), None);
    }

    #[test]
    fn help_is_shown_even_with_a_broken_file() {
        for args in [
            &["source", "--config", "/nonexistent/x.toml", "--help"][..],
            &["backup", "-h", "--config", "/nonexistent/x.toml"][..],
        ] {
            match parse_strs(args) {
                Err(ParseError::Clap(e)) => assert_eq!(e.kind(), ErrorKind::DisplayHelp),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn lines_are_counted_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }
}
