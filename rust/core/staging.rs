//! Where every output is written: a staging folder beside OUT, renamed into place only when complete.
//!
//! - The guard: OUT may not be, contain or lie inside any input, and an existing OUT needs `overwrite`.
//! - Ownership: each staging folder `.OUT.lorafast-tmp-PID-STAMP` has a lock file beside it
//!   (`...STAMP.lock`) that its process holds with `flock` while it runs. The kernel drops the lock when
//!   the process dies, however it dies, so a later run can tell a killed run's leftovers (removed, and
//!   said) from a live run's folder (never touched).
//! - Space: the planned size is checked against the free space of OUT's filesystem before any data is
//!   written.
//! - Commit: an existing OUT is swapped with the finished folder in one atomic `renameat2(EXCHANGE)`,
//!   so at every instant OUT is either the old or the new output, then the old one is deleted.
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::core::error::{Error, Result};

/// What staging names contain; a sweep looks only at dot-names holding it.
const TAG: &str = ".lorafast-tmp-";
const LOCK_SUFFIX: &str = ".lock";
const OLD_SUFFIX: &str = ".old";

/// An absolute path, resolving links of every existing part (so a link to an input is caught); parts
/// that do not exist yet are appended as they are.
fn absolute(p: &Path) -> Result<PathBuf> {
    if p.exists() {
        return p.canonicalize().map_err(|e| Error::io(p, e));
    }
    let name = p
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not a usable output path", p.display())))?;
    let parent = p
        .parent()
        .filter(|x| !x.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(absolute(parent)?.join(name))
}

/// The input-overlap guard and the overwrite rule, without creating anything. Returns OUT, absolute.
pub fn check_output(out: &Path, inputs: &[&Path], overwrite: bool) -> Result<PathBuf> {
    let out_abs = absolute(out)?;
    for input in inputs {
        let input = absolute(input)?;
        if out_abs == input || out_abs.starts_with(&input) || input.starts_with(&out_abs) {
            return Err(Error::Output {
                path: out.to_path_buf(),
                reason: format!(
                    "overlaps the input {}; lorafast never writes into its inputs",
                    input.display()
                ),
            });
        }
    }
    if out_abs.exists() && !overwrite {
        return Err(Error::Output {
            path: out.to_path_buf(),
            reason: "already exists; pass --overwrite (overwrite=True) to replace it".into(),
        });
    }
    Ok(out_abs)
}

/// A staging folder beside OUT, renamed into place on success and removed on failure.
pub struct Staging {
    pub tmp: PathBuf,
    out: PathBuf,
    overwrite: bool,
    committed: bool,
    /// Held (flock) for the staging folder's whole life; see the module comment.
    lock: Option<(File, PathBuf)>,
    /// One line per thing the sweep removed (leftovers of killed runs), for the caller to show.
    pub notices: Vec<String>,
}

impl Staging {
    /// Claims OUT (refusing an existing one without `overwrite`, or one overlapping `inputs`) and
    /// clears what killed runs left beside it, before any work is done.
    pub fn new(out: &Path, inputs: &[&Path], overwrite: bool) -> Result<Self> {
        Self::claim(out, inputs, overwrite, false)
    }

    /// The same for an output that is one file (a GGUF model): the staging path is an empty file.
    pub fn new_file(out: &Path, inputs: &[&Path], overwrite: bool) -> Result<Self> {
        Self::claim(out, inputs, overwrite, true)
    }

    fn claim(out: &Path, inputs: &[&Path], overwrite: bool, file: bool) -> Result<Self> {
        let out_abs = check_output(out, inputs, overwrite)?;
        let parent = out_abs.parent().expect("absolute() gives a parent").to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let notices = sweep(&parent);
        let name = out_abs
            .file_name()
            .expect("absolute() gives a name")
            .to_string_lossy()
            .into_owned();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = parent.join(format!(".{name}{TAG}{}-{stamp}", std::process::id()));
        // The lock exists (and is held) before the folder does, so no sweep ever sees the folder unowned.
        let lock_path = lock_path_of(&tmp);
        let lock = File::options()
            .write(true)
            .create_new(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        if !try_lock(&lock) {
            let _ = std::fs::remove_file(&lock_path);
            return Err(Error::io(
                &lock_path,
                std::io::Error::other("cannot lock the staging folder's lock file"),
            ));
        }
        let staging = Staging {
            tmp,
            out: out_abs,
            overwrite,
            committed: false,
            lock: Some((lock, lock_path)),
            notices,
        };
        // If this fails, Drop removes the lock file again.
        let created = if file {
            File::options()
                .write(true)
                .create_new(true)
                .open(&staging.tmp)
                .map(drop)
        } else {
            std::fs::create_dir(&staging.tmp)
        };
        created.map_err(|e| Error::io(&staging.tmp, e))?;
        Ok(staging)
    }

    /// Fail in one line, before any data is written, when OUT's filesystem cannot hold `bytes` more.
    pub fn check_space(&self, bytes: u64) -> Result<()> {
        let Some(free) = free_bytes(&self.tmp) else {
            return Ok(()); // unknown: the write itself will say ENOSPC cleanly
        };
        // A little room for the header, index, config and tokenizer files.
        let need = bytes + (bytes / 1000).max(1 << 20);
        if free < need {
            return Err(Error::Output {
                path: self.out.clone(),
                reason: format!(
                    "needs {} but its filesystem has {} free; free some space or choose another folder",
                    human(need),
                    human(free)
                ),
            });
        }
        Ok(())
    }

    /// Move the finished folder into place. An old OUT is replaced only now, atomically where the
    /// filesystem can swap two names.
    pub fn commit(mut self) -> Result<PathBuf> {
        match rename_noreplace(&self.tmp, &self.out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists || self.out.exists() => {
                if !self.overwrite {
                    return Err(Error::Output {
                        path: self.out.clone(),
                        reason: "appeared while writing; not replaced".into(),
                    });
                }
                self.replace_existing()?;
            }
            Err(e) => return Err(Error::io(&self.out, e)),
        }
        self.committed = true;
        Ok(self.out.clone())
    }

    fn replace_existing(&mut self) -> Result<()> {
        match rename_exchange(&self.tmp, &self.out) {
            Ok(()) => {
                // The old output now sits at the staging name, still covered by our lock.
                remove_any(&self.tmp).map_err(|e| Error::io(&self.tmp, e))
            }
            Err(_) => {
                // No atomic swap here (an old kernel, some network filesystems): two renames. A crash in
                // between leaves the old OUT at `.old`, which the next sweep puts back.
                let old = PathBuf::from(format!("{}{OLD_SUFFIX}", self.tmp.display()));
                std::fs::rename(&self.out, &old).map_err(|e| Error::io(&self.out, e))?;
                std::fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))?;
                remove_any(&old).map_err(|e| Error::io(&old, e))
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_any(&self.tmp);
        }
        // Last, so that the folder is never there without its lock.
        if let Some((file, path)) = self.lock.take() {
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
    }
}

fn lock_path_of(staging: &Path) -> PathBuf {
    PathBuf::from(format!("{}{LOCK_SUFFIX}", staging.display()))
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn try_lock(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// The PID in a staging name `.OUT.lorafast-tmp-PID-STAMP[.old]`, and OUT's name.
fn parse_name(name: &str) -> Option<(String, u32)> {
    let (out, rest) = name.strip_prefix('.')?.rsplit_once(TAG)?;
    let pid = rest.split('-').next()?.parse().ok()?;
    Some((out.to_string(), pid))
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove what killed runs left in `dir`: staging folders (and their lock files) whose lock nobody
/// holds. A folder without a lock file (written by an older lorafast) goes only when its PID is gone.
/// Returns one line per removal; never fails (a sweep is housekeeping, not the job).
pub fn sweep(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut notices = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') || !name.contains(TAG) || name.ends_with(LOCK_SUFFIX) {
            continue;
        }
        let Some((out_name, pid)) = parse_name(name.trim_end_matches(OLD_SUFFIX)) else {
            continue;
        };
        let path = entry.path();
        let owner = PathBuf::from(format!("{}", path.display()).trim_end_matches(OLD_SUFFIX).to_string());
        let lock_path = lock_path_of(&owner);
        // Holding the dead owner's lock keeps two sweepers from working on the same leftovers.
        let held = match File::options().write(true).open(&lock_path) {
            Ok(f) if try_lock(&f) => Some(f),
            Ok(_) => continue, // a live run
            Err(_) if process_alive(pid) => continue,
            Err(_) => None,
        };
        let size = du(&path);
        if name.ends_with(OLD_SUFFIX) {
            // A run died between its two renames: this is the user's previous OUT. Put it back.
            let out = dir.join(&out_name);
            if !out.exists() && std::fs::rename(&path, &out).is_ok() {
                notices.push(format!(
                    "restored {} from {name}, left by an interrupted run (process {pid})",
                    out.display()
                ));
                continue;
            }
        }
        if remove_any(&path).is_ok() {
            notices.push(format!(
                "removed {} ({}) left by an interrupted run (process {pid})",
                path.display(),
                human(size)
            ));
        }
        if held.is_some() && !owner.exists() {
            let _ = std::fs::remove_file(&lock_path);
        }
    }
    notices
}

/// Bytes under a path (apparent size of the allocated blocks).
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !m.is_dir() {
        return m.blocks() * 512;
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| du(&e.path())).sum())
        .unwrap_or(0)
}

fn free_bytes(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

pub fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KB", "MB", "GB", "TB"] {
        if v < 1000.0 || unit == "TB" {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1000.0;
    }
    unreachable!("the loop returns at TB")
}

fn c_path(p: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let (a, b) = (c_path(from)?, c_path(to)?);
    // SAFETY: two valid C strings; AT_FDCWD resolves them like rename(2) does.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// rename(2) that fails with AlreadyExists instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
            if to.exists() {
                return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
            }
            std::fs::rename(from, to)
        }
        r => r,
    }
}

fn rename_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PID of a process that has exited.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    fn leftover(dir: &Path, out: &str, pid: u32) -> PathBuf {
        let tmp = dir.join(format!(".{out}{TAG}{pid}-1"));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("model.safetensors"), vec![0u8; 10_000]).unwrap();
        tmp
    }

    #[test]
    fn a_killed_runs_folder_is_removed_and_said() {
        let dir = tempfile::tempdir().unwrap();
        // An unlocked lock file: its owner is gone.
        let tmp = leftover(dir.path(), "out", dead_pid());
        std::fs::write(lock_path_of(&tmp), b"").unwrap();
        let s = Staging::new(&dir.path().join("out"), &[], false).unwrap();
        assert!(!tmp.exists() && !lock_path_of(&tmp).exists());
        assert_eq!(s.notices.len(), 1, "{:?}", s.notices);
        assert!(s.notices[0].contains("interrupted run") && s.notices[0].contains("KB"));
    }

    #[test]
    fn a_live_runs_folder_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let live = Staging::new(&dir.path().join("a"), &[], false).unwrap();
        let other = Staging::new(&dir.path().join("b"), &[], false).unwrap();
        assert!(live.tmp.exists() && other.notices.is_empty());
        // Without a lock file, a folder whose PID is alive stays too.
        let legacy = leftover(dir.path(), "c", std::process::id());
        assert!(sweep(dir.path()).is_empty() && legacy.exists());
        drop(live);
        drop(other);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "only the legacy folder is left: {names:?}");
    }

    #[test]
    fn an_interrupted_replacement_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(format!(".out{TAG}{}-1{OLD_SUFFIX}", dead_pid()));
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("config.json"), b"{}").unwrap();
        let notices = sweep(dir.path());
        assert!(dir.path().join("out/config.json").exists(), "{notices:?}");
        assert!(notices[0].starts_with("restored"));
    }

    #[test]
    fn commit_replaces_an_existing_output_whole() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("stale.txt"), b"x").unwrap();
        let s = Staging::new(&out, &[], true).unwrap();
        std::fs::write(s.tmp.join("new.txt"), b"y").unwrap();
        s.commit().unwrap();
        assert!(out.join("new.txt").exists() && !out.join("stale.txt").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn overlapping_inputs_and_space() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir(&input).unwrap();
        for out in [input.clone(), input.join("x"), dir.path().to_path_buf()] {
            let e = check_output(&out, &[&input], true).unwrap_err().to_string();
            assert!(e.contains("overlaps the input"), "{e}");
        }
        let s = Staging::new(&dir.path().join("o"), &[&input], false).unwrap();
        assert!(s.check_space(1).is_ok());
        let e = s.check_space(u64::MAX / 4).unwrap_err().to_string();
        assert!(e.contains("free"), "{e}");
    }
}
