//! The README's "Configuration" flag table agrees with clap's definition of `ssegate serve`
//! (src/config.rs is the truth): one row per flag, no row for a flag that does not exist, and
//! each row's env and default columns equal to clap's.
//!
//! How a cell is compared (the README follows these rules):
//! - flag: `` `--long-name` ``.
//! - env: `` `SSEGATE_…` ``, or `–` for a flag with no environment variable.
//! - default: the default in backticks, several values joined by `,`; a trailing note in
//!   parentheses is ignored (`` `0` (off) ``). With no default value in clap (an `Option`, an
//!   empty list): `–`. A boolean switch (clap's implicit default `false`): `off`.

use std::collections::BTreeMap;

use clap::{ArgAction, CommandFactory};
use ssegate::config::Cli;

/// What the README's row for `arg` must say: (env cell, default cell).
fn expected_cells(arg: &clap::Arg) -> (String, String) {
    let env = arg.get_env().map_or_else(|| "–".to_owned(), |e| format!("`{}`", e.to_string_lossy()));
    let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
    let default = if matches!(arg.get_action(), ArgAction::SetTrue) && defaults == ["false"] {
        "off".to_owned()
    } else if defaults.is_empty() {
        "–".to_owned()
    } else {
        format!("`{}`", defaults.join(","))
    };
    (env, default)
}

/// A default cell without its trailing parenthesised note: `` `0` (off) `` → `` `0` ``.
fn normalise_default(cell: &str) -> &str {
    let cell = cell.trim();
    match cell.rfind(" (") {
        Some(i) if cell.ends_with(')') => cell[..i].trim_end(),
        _ => cell,
    }
}

struct Row {
    line: usize,
    flag: String,
    env: String,
    default: String,
}

/// The rows of the first table under `## Configuration`, by the header's column names.
fn configuration_rows(readme: &str) -> Result<Vec<Row>, String> {
    let mut lines = readme.lines().enumerate().skip_while(|(_, l)| l.trim() != "## Configuration");
    lines.next().ok_or("README.md has no `## Configuration` section")?;
    let mut lines =
        lines.take_while(|(_, l)| !l.starts_with("## ")).skip_while(|(_, l)| !l.trim_start().starts_with('|'));
    let cells = |l: &str| -> Vec<String> {
        let l = l.trim();
        let l = l.strip_prefix('|').unwrap_or(l);
        let l = l.strip_suffix('|').unwrap_or(l);
        l.split('|').map(|c| c.trim().to_owned()).collect()
    };
    let (_, header) = lines.next().ok_or("no table in the Configuration section")?;
    let header = cells(header);
    let column = |name: &str| {
        header.iter().position(|h| h == name).ok_or(format!("the Configuration table has no `{name}` column"))
    };
    let (flag, env, default) = (column("flag")?, column("env")?, column("default")?);
    let mut rows = Vec::new();
    for (i, l) in lines.take_while(|(_, l)| l.trim_start().starts_with('|')) {
        let c = cells(l);
        if c.iter().all(|c| c.chars().all(|ch| matches!(ch, '-' | ':'))) {
            continue; // the |---|---| separator
        }
        if c.len() != header.len() {
            return Err(format!("README.md:{}: {} cells, the header has {}", i + 1, c.len(), header.len()));
        }
        rows.push(Row { line: i + 1, flag: c[flag].clone(), env: c[env].clone(), default: c[default].clone() });
    }
    Ok(rows)
}

#[test]
fn readme_flag_table_matches_the_clap_definition_of_serve() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let rows = configuration_rows(&readme).unwrap();

    let mut cli = Cli::command();
    cli.build(); // adds clap's implicit values (a switch's `false` default)
    let serve = cli.find_subcommand("serve").expect("`serve` subcommand");
    let flags: BTreeMap<&str, &clap::Arg> = serve
        .get_arguments()
        .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
        .filter_map(|a| a.get_long().map(|long| (long, a)))
        .collect();

    let mut problems = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        let Some(long) = row.flag.strip_prefix("`--").and_then(|f| f.strip_suffix('`')) else {
            problems.push(format!("README.md:{}: flag cell {:?} is not `--name`", row.line, row.flag));
            continue;
        };
        let Some((long, arg)) = flags.get_key_value(long) else {
            problems.push(format!("--{long}: in the README (line {}) but not a flag of `serve`", row.line));
            continue;
        };
        *seen.entry(long).or_default() += 1;
        let (env, default) = expected_cells(arg);
        if row.env != env {
            problems.push(format!("--{long}: README env {} (line {}), clap says {env}", row.env, row.line));
        }
        if normalise_default(&row.default) != default {
            problems.push(format!("--{long}: README default {} (line {}), clap says {default}", row.default, row.line));
        }
    }
    for long in flags.keys() {
        match seen.get(long).copied().unwrap_or(0) {
            1 => {}
            0 => problems.push(format!("--{long}: a flag of `serve` with no row in the README")),
            n => problems.push(format!("--{long}: {n} rows in the README")),
        }
    }
    assert!(
        problems.is_empty(),
        "README.md's Configuration table disagrees with src/config.rs ({} problems):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
