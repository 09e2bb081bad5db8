//! Payloads kept by reference.

use super::*;

/// Payloads kept by reference.
#[async_trait::async_trait]
pub trait Payloads: Send + Sync {
    /// Stores a payload's value under `name` (`<run_id>/<sha256>`, so the
    /// same name is the same content): an object of that name kept for
    /// less than half of `retention` is kept as it is, an older one is
    /// stored again so it outlives the handoff that names it now.
    async fn put_payload(&self, name: &str, value: Bytes) -> Result<PayloadInfo>;

    /// The size and digest of the payload stored under `name`, if kept.
    async fn payload_info(&self, name: &str) -> Result<Option<PayloadInfo>>;

    /// The value of the payload stored under `name`, if kept (checked
    /// against its digest as it is read).
    async fn get_payload(&self, name: &str) -> Result<Option<Bytes>>;

    /// The payload stored under `name`, if kept, to read as it comes (a
    /// value that does not match its digest fails the read at its end).
    async fn read_payload(&self, name: &str) -> Result<Option<PayloadReader>>;
}

/// A payload's value, read as it comes.
pub type PayloadReader = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;
