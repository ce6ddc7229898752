// SPDX-License-Identifier: Apache-2.0
//! Records the git revision for `vmm-takeover --version` (env `VMM_TAKEOVER_GIT_REV`).
//!
//! Never fails the build: without git or outside a checkout (a crates.io tarball) the revision is
//! `unknown`. Packagers may set `VMM_TAKEOVER_GIT_REV` themselves.

use std::path::{Path, PathBuf};
use std::process::Command;

const VAR: &str = "VMM_TAKEOVER_GIT_REV";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={VAR}");
    let rev = match std::env::var(VAR) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => {
            watch_head();
            git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env={VAR}={rev}");
}

/// `git ARGS` in the package's directory; its trimmed stdout if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Asks cargo to rerun this script when HEAD moves: a checkout changes HEAD, a commit changes
/// the branch's ref (loose or packed). Only existing files are named: cargo reruns the script on
/// every build for a path that does not exist.
fn watch_head() {
    let (Some(git_dir), Some(common)) = (
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ) else {
        return;
    };
    let git_dir = PathBuf::from(git_dir);
    // --git-common-dir may be relative to the package directory.
    let common = match std::env::var_os("CARGO_MANIFEST_DIR") {
        Some(m) => Path::new(&m).join(common),
        None => PathBuf::from(common),
    };
    let mut watch = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let loose = common.join(&r);
        // A branch only in packed-refs gets a loose ref file at its next commit: watch the
        // directory it will appear in.
        if !loose.is_file() {
            if let Some(dir) = loose.parent() {
                watch_dir(dir);
            }
        }
        watch.push(loose);
    }
    for p in watch.into_iter().filter(|p| p.is_file()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

fn watch_dir(dir: &Path) {
    if dir.is_dir() {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
}
