//! The project's text describes the project as it is. A comment, a migration or a page
//! that points at a work item ("issue" and a number, a numbered "change", a "stop" of
//! work) sends the reader somewhere they cannot follow: the repository has no tracker,
//! and history is git's. Decisions that need their measurements go to `docs/decisions/`.
//!
//! Checks every text file git tracks (or, outside a git checkout, every file under the
//! project but build output and installed packages).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use regex::Regex;

/// Words that refer to how the work was organised rather than to the project.
fn diary() -> Regex {
    Regex::new(concat!(
        r"(?i)\bissues? #?[0-9]+",
        r"|\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|this|previous",
        r"|last|next|earlier|later|same) stops?\b",
        r"|\bstops? [0-9]+",
        r"|\bchanges? [0-9]+",
        r"|\bthis chang(e|es)\b",
        r"|\bsessions? of work\b",
    ))
    .unwrap()
}

fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files to check, relative to the project's root.
fn project_files(root: &Path) -> Vec<PathBuf> {
    let listed = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output();
    match listed {
        Ok(out) if out.status.success() => out
            .stdout
            .split(|b| *b == 0)
            .filter(|name| !name.is_empty())
            .map(|name| PathBuf::from(String::from_utf8_lossy(name).into_owned()))
            .collect(),
        _ => walk(root, Path::new("")),
    }
}

fn walk(root: &Path, dir: &Path) -> Vec<PathBuf> {
    const SKIPPED: [&str; 6] = [".git", "target", "node_modules", "tools", ".venv", "dist"];
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root.join(dir)).unwrap() {
        let entry = entry.unwrap();
        let name = dir.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            if !SKIPPED.iter().any(|s| entry.file_name() == *s) {
                files.extend(walk(root, &name));
            }
        } else {
            files.push(name);
        }
    }
    files
}

/// `path:line: text` of every line of `text` that refers to the work rather than the
/// project.
fn findings(path: &Path, text: &str, diary: &Regex) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| diary.is_match(line))
        .map(|(i, line)| format!("{}:{}: {}", path.display(), i + 1, line.trim()))
        .collect()
}

#[test]
fn no_text_of_the_project_refers_to_issues_or_stops_of_work() {
    let root = project_root();
    let diary = diary();
    let files = project_files(&root);
    assert!(
        files.iter().any(|f| f == Path::new("README.md")),
        "the project's files were not found under {}",
        root.display()
    );
    let mut found = Vec::new();
    for file in &files {
        // Binary files (the descriptor snapshot, images) hold no prose.
        let Ok(text) = std::fs::read_to_string(root.join(file)) else {
            continue;
        };
        found.extend(findings(file, &text, &diary));
    }
    assert!(
        found.is_empty(),
        "text that points at work items a reader cannot see; say what the project does \
         and why (a measured reason goes to docs/decisions/):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_catches_what_it_is_for_and_passes_plain_prose() {
    let diary = diary();
    let number = 16;
    let caught = [
        format!("see docs/BENCHMARKS.md, issue {number}"),
        format!("Resumable feeds are Issues {number}."),
        format!("measured in the third {}", "stop"),
        format!("since the previous {} the writers batch", "stop"),
        format!("change {number} made it one statement"),
        format!("as this {} shows", "change"),
        format!("left for a later session of {}", "work"),
    ];
    for line in &caught {
        assert_eq!(
            findings(Path::new("x.md"), line, &diary).len(),
            1,
            "not caught: {line}"
        );
    }
    let plain = [
        "On SIGTERM the server stops accepting connections.",
        "Stop PostgreSQL, then start it again.",
        "A session (a call or a meeting) has participants.",
        "JoinSession raises the session's last connection.",
        "Two users in the same session, in the last session of the day.",
        "A client that stops without a trailer stores nothing.",
    ];
    for line in plain {
        assert!(
            findings(Path::new("x.md"), line, &diary).is_empty(),
            "plain prose flagged: {line}"
        );
    }
}
