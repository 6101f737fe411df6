//! A local workload's log as a stream: the attempt's log file read in chunks, and, followed, read again as it
//! grows until the attempt ends.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use tokio::io::AsyncReadExt as _;

use crate::LogStream;
use crate::error::RuntimeError;

/// How many bytes a stream item holds at most.
const CHUNK: usize = 8 * 1024;
/// How often a followed log that has no new output is read again.
const POLL: Duration = Duration::from_millis(100);

/// Streams the log at `path`; with `follow`, waits for more while `running` says the attempt goes on, and reads to
/// the end once it ended.
pub(crate) async fn stream<F, Fut>(path: PathBuf, follow: bool, running: F) -> Result<LogStream, RuntimeError>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => Some(file),
        // An attempt that has not written yet may not have its file yet.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(RuntimeError::io(format!("opening {}", path.display()), error)),
    };
    let state = Reader {
        path,
        file,
        follow,
        finishing: false,
    };
    Ok(
        futures::stream::unfold((state, running), |(mut state, running)| async move {
            loop {
                match state.read().await {
                    Ok(Some(chunk)) => return Some((Ok(chunk), (state, running))),
                    Ok(None) => {}
                    Err(error) => {
                        state.follow = false;
                        state.finishing = true;
                        return Some((Err(error), (state, running)));
                    }
                }
                // At the end of what was written.
                if !state.follow || state.finishing {
                    return None;
                }
                if running().await {
                    tokio::time::sleep(POLL).await;
                } else {
                    // One more read takes what was written before the attempt ended.
                    state.finishing = true;
                }
            }
        })
        .boxed(),
    )
}

struct Reader {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    follow: bool,
    /// The attempt ended: what is left is read, then the stream ends.
    finishing: bool,
}

impl Reader {
    /// The next chunk, or `None` at the current end of the file.
    async fn read(&mut self) -> Result<Option<Bytes>, RuntimeError> {
        if self.file.is_none() {
            match tokio::fs::File::open(&self.path).await {
                Ok(file) => self.file = Some(file),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(RuntimeError::io(format!("opening {}", self.path.display()), error)),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(None);
        };
        let mut buffer = vec![0; CHUNK];
        let read = file
            .read(&mut buffer)
            .await
            .map_err(|error| RuntimeError::io(format!("reading {}", self.path.display()), error))?;
        if read == 0 {
            return Ok(None);
        }
        buffer.truncate(read);
        Ok(Some(Bytes::from(buffer)))
    }
}
