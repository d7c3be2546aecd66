//! Object storage backend (S3-compatible, or any `object_store`): `<prefix>/sha256/ab/cd/<hash>`.
//!
//! Small blobs (under one part) are buffered and PUT straight under their hash once it is known.
//! Larger ones stream as a multipart upload to `<prefix>/tmp/<uuid>` (invisible until complete),
//! then a server-side copy puts them under their hash. Memory per writer stays bounded by
//! `part_size × (1 + MAX_IN_FLIGHT)`.

use std::io;
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::runtime::Handle;

use crate::{key_of, BlobError, BlobRead};

/// Parts uploading concurrently per writer: overlaps the network with hashing the next part.
const MAX_IN_FLIGHT: usize = 2;

struct Shared {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    part_size: usize,
    handle: Handle,
}

impl Shared {
    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    async fn exists(&self, path: &Path) -> Result<bool, BlobError> {
        match self.store.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

pub(crate) struct ObjectBackend {
    shared: Arc<Shared>,
}

impl ObjectBackend {
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        url: String,
        part_size: usize,
        handle: Handle,
    ) -> Self {
        let prefix = prefix.trim_matches('/').to_string();
        let url = url.trim_end_matches('/').to_string();
        ObjectBackend { shared: Arc::new(Shared { store, prefix, url, part_size, handle }) }
    }

    pub(crate) fn url(&self) -> &str {
        &self.shared.url
    }

    pub(crate) fn sink(&self) -> ObjectSink {
        ObjectSink { shared: self.shared.clone(), first: Vec::new(), upload: None }
    }

    pub(crate) async fn open(&self, sha256: &str) -> Result<Option<BlobRead>, BlobError> {
        match self.shared.store.get(&self.shared.path(&key_of(sha256))).await {
            Ok(r) => {
                let size = r.meta.size;
                let stream = r.into_stream().map(|c| c.map_err(io::Error::other)).boxed();
                Ok(Some(BlobRead { size, stream }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn exists(&self, sha256: &str) -> Result<bool, BlobError> {
        self.shared.exists(&self.shared.path(&key_of(sha256))).await
    }

    pub(crate) async fn delete(&self, sha256: &str) -> Result<bool, BlobError> {
        let path = self.shared.path(&key_of(sha256));
        // S3 answers a delete of a missing key with success, so ask first.
        if !self.shared.exists(&path).await? {
            return Ok(false);
        }
        self.shared.store.delete(&path).await?;
        Ok(true)
    }
}

struct Upload {
    tmp: Path,
    parts: WriteMultipart,
}

pub(crate) struct ObjectSink {
    shared: Arc<Shared>,
    /// The first part, kept until it is full: small blobs never need a multipart upload.
    first: Vec<u8>,
    upload: Option<Upload>,
}

impl ObjectSink {
    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<(), BlobError> {
        let shared = self.shared.clone();
        if self.upload.is_none() {
            self.first.extend_from_slice(buf);
            if self.first.len() < shared.part_size {
                return Ok(());
            }
            let tmp = shared.path(&format!("tmp/{}", uuid::Uuid::new_v4().simple()));
            let upload = shared.handle.block_on(shared.store.put_multipart(&tmp))?;
            let mut parts = WriteMultipart::new_with_chunk_size(upload, shared.part_size);
            let first = std::mem::take(&mut self.first);
            {
                // `WriteMultipart` spawns its part uploads onto the current runtime.
                let _rt = shared.handle.enter();
                parts.write(&first);
            }
            self.upload = Some(Upload { tmp, parts });
        } else if let Some(up) = &mut self.upload {
            let _rt = shared.handle.enter();
            up.parts.write(buf);
        }
        if let Some(up) = &mut self.upload {
            // Backpressure: never more than MAX_IN_FLIGHT parts buffered in uploads.
            shared.handle.block_on(up.parts.wait_for_capacity(MAX_IN_FLIGHT))?;
        }
        Ok(())
    }

    pub(crate) fn commit(mut self, sha256: &str) -> Result<String, BlobError> {
        let shared = self.shared.clone();
        let key = key_of(sha256);
        let target = shared.path(&key);
        let location = format!("{}/{key}", shared.url);
        match self.upload.take() {
            None => {
                let first = std::mem::take(&mut self.first);
                shared.handle.block_on(async {
                    if !shared.exists(&target).await? {
                        shared.store.put(&target, PutPayload::from(first)).await?;
                    }
                    Ok::<_, BlobError>(())
                })?;
            }
            Some(Upload { tmp, parts }) => {
                shared.handle.block_on(async {
                    // On failure `finish` aborts the upload itself.
                    parts.finish().await?;
                    let placed = async {
                        if !shared.exists(&target).await? {
                            shared.store.copy(&tmp, &target).await?;
                        }
                        Ok::<_, BlobError>(())
                    }
                    .await;
                    let _ = shared.store.delete(&tmp).await;
                    placed
                })?;
            }
        }
        Ok(location)
    }
}

impl Drop for ObjectSink {
    fn drop(&mut self) {
        if let Some(up) = self.upload.take() {
            // Abandoned: drop the uploaded parts (storage providers bill for them) in the
            // background; nothing is visible under the temp key until `complete`.
            self.shared.handle.spawn(async move {
                let _ = up.parts.abort().await;
            });
        }
    }
}
