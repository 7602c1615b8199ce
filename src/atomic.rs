//! Crash-safe writes: every file and directory the tool leaves on disk (adapters, optimizer
//! state, run files, checkpoints, evaluation summaries) goes through here.
//!
//! A file is written under a temporary sibling name, synced, renamed over the target, and the
//! parent directory is synced so the rename itself survives a power cut. A reader, or a run
//! resumed after a crash, sees the old content or the new one, never half of either.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

/// Writes `bytes` to `path` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        fs::write(tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// Lets `write` create the file at a temporary path, then puts it at `path` atomically: for
/// writers that only take a path (safetensors).
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path)?;
    if let Err(e) = write(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    sync_parent(path)
}

/// Fills a fresh temporary directory next to `dir` with `fill`, then puts it in `dir`'s place
/// (moving an existing `dir` aside first when `replace` is set, and deleting it afterwards). On
/// error the temporary directory is removed and `dir` is untouched.
pub fn write_dir(dir: &Path, replace: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(dir);
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(&parent)
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;
    fill(staging.path())?;
    sync_dir(staging.path())?;

    let old = if dir.exists() {
        ensure!(replace, "{} already exists", dir.display());
        // Renaming onto an empty directory is allowed; the tempdir reserves a unique name.
        let aside = tempfile::Builder::new()
            .prefix(&format!(".{name}.old-"))
            .tempdir_in(&parent)?
            .keep();
        fs::rename(dir, &aside).with_context(|| format!("cannot move {} aside", dir.display()))?;
        Some(aside)
    } else {
        None
    };
    let staged = staging.keep();
    if let Err(e) = fs::rename(&staged, dir) {
        if let Some(old) = &old {
            // Best effort: put the previous version back before reporting.
            let _ = fs::rename(old, dir);
        }
        let _ = fs::remove_dir_all(&staged);
        return Err(e).with_context(|| format!("cannot move the new files into {}", dir.display()));
    }
    sync_dir(&parent)?;
    if let Some(old) = old {
        fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove the previous version {}", old.display()))?;
    }
    Ok(())
}

fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    Ok(path.with_file_name(tmp_name))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sync_parent(path: &Path) -> Result<()> {
    sync_dir(&parent_of(path))
}

/// Makes a directory's entries (a rename into it) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_file(&path, b"old").unwrap();
        let err = write_with(&path, |tmp| {
            fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn a_failed_fill_leaves_the_old_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapter");
        write_dir(&dir, false, |tmp| write_file(&tmp.join("a"), b"1")).unwrap();
        assert!(write_dir(&dir, false, |_| Ok(())).is_err(), "no replace");
        let err = write_dir(&dir, true, |tmp| {
            write_file(&tmp.join("a"), b"2")?;
            anyhow::bail!("interrupted")
        });
        assert!(err.is_err());
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"1");
        write_dir(&dir, true, |tmp| write_file(&tmp.join("a"), b"3")).unwrap();
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"3");
        assert_eq!(
            fs::read_dir(root.path()).unwrap().count(),
            1,
            "no leftovers"
        );
    }
}
