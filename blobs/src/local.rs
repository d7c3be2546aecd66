//! Local folder backend: `<root>/sha256/ab/cd/<hash>`, written through `<root>/tmp/` and renamed
//! into place, so a blob is either complete under its hash or not there at all.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio_util::io::ReaderStream;

use crate::{key_of, BlobError, BlobRead};

/// Temp files older than this are leftovers of a crashed process (live writes finish in minutes).
const STALE_TEMP: Duration = Duration::from_secs(24 * 3600);

pub(crate) struct LocalBackend {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalBackend {
    pub(crate) fn new(root: PathBuf) -> Result<Self, BlobError> {
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp)?;
        // Absolute, so locations stay valid whatever the reader's working directory.
        let root = fs::canonicalize(&root)?;
        let tmp = root.join("tmp");
        remove_stale_temps(&tmp);
        Ok(LocalBackend { root, tmp })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(key_of(sha256))
    }

    pub(crate) fn sink(&self) -> Result<LocalSink, BlobError> {
        let temp = self.tmp.join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let file = File::options().write(true).create_new(true).open(&temp)?;
        Ok(LocalSink { file: Some(BufWriter::with_capacity(256 * 1024, file)), temp, root: self.root.clone() })
    }

    pub(crate) async fn open(&self, sha256: &str) -> Result<Option<BlobRead>, BlobError> {
        let file = match tokio::fs::File::open(self.path_of(sha256)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let size = file.metadata().await?.len();
        let stream = ReaderStream::with_capacity(file, 64 * 1024).boxed();
        Ok(Some(BlobRead { size, stream }))
    }

    pub(crate) async fn exists(&self, sha256: &str) -> Result<bool, BlobError> {
        Ok(tokio::fs::try_exists(self.path_of(sha256)).await?)
    }

    pub(crate) async fn delete(&self, sha256: &str) -> Result<bool, BlobError> {
        match tokio::fs::remove_file(self.path_of(sha256)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn remove_stale_temps(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else { return };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > STALE_TEMP);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}

pub(crate) struct LocalSink {
    /// `None` once committed: Drop then has nothing to clean up.
    file: Option<BufWriter<File>>,
    temp: PathBuf,
    root: PathBuf,
}

impl LocalSink {
    pub(crate) fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.write_all(buf),
            None => Err(io::Error::other("blob writer already finished")),
        }
    }

    pub(crate) fn commit(mut self, sha256: &str) -> Result<String, BlobError> {
        let file = self.file.take().ok_or_else(|| io::Error::other("blob writer already finished"))?;
        let placed = self.place(file, sha256);
        // Gone after a successful rename; otherwise an abandoned temp (unique name: no race).
        let _ = fs::remove_file(&self.temp);
        placed
    }

    fn place(&self, file: BufWriter<File>, sha256: &str) -> Result<String, BlobError> {
        let file = file.into_inner().map_err(|e| e.into_error())?;
        let target = self.root.join(key_of(sha256));
        let location = format!("file://{}", target.display());
        if target.exists() {
            // Already stored: same hash, same bytes.
            return Ok(location);
        }
        // Data on disk before the name points at it: after a power loss the hash never names a
        // short file.
        file.sync_all()?;
        drop(file);
        let dir = target.parent().ok_or_else(|| io::Error::other("blob path has no parent"))?;
        fs::create_dir_all(dir)?;
        fs::rename(&self.temp, &target)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(location)
    }
}

impl Drop for LocalSink {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}
