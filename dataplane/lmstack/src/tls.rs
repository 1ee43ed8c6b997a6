//! TLS on the client side (rustls with ring): the certificate and key read from PEM files
//! and read again when they change, the handshake within its deadline, and a connection's
//! read and write halves over monoio's TCP halves.
//!
//! The halves share one rustls `ServerConnection` (`Rc<RefCell>`, borrowed only between
//! awaits, never across one): the client-leave watch reads while the relay writes, as on
//! plain TCP. Reads go through the TCP half's cancellable read, so a cancelled read keeps
//! what it read (ciphertext stays buffered here, plaintext in the caller's buffer): a TLS
//! stream cannot lose a byte without breaking. Not here: HTTP (downstream.rs reads and writes
//! plaintext through these halves as through TCP), TLS to engines, client certificates.

use std::cell::RefCell;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, CancelHandle, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ServerConnection;

use crate::bufio;
use crate::config::{TlsConfig, ms};
use crate::metrics;

/// Ciphertext read at once: at least a whole TLS record (16 KiB and a few bytes), more when
/// the caller expects more (a large body), up to `MAX_READ`.
const MIN_READ: usize = 16 * 1024 + 512;
const MAX_READ: usize = 64 * 1024;
/// Plaintext decrypted ahead of the caller: rustls refuses more records past 16 KiB.
const PLAINTEXT_AHEAD: usize = 16 * 1024;
/// The write buffer of an idle connection keeps at most this much capacity.
const KEEP_WRITE_CAPACITY: usize = 64 * 1024;

/// What the listener needs: the current server configuration (certificate, key, ALPN) and
/// the handshake deadline. Shared by all workers; the reload thread replaces the
/// configuration, each new connection takes the one current at its accept.
pub struct Acceptor {
    current: ArcSwap<ServerConfig>,
    handshake_timeout: Duration,
}

/// Why a connection did not become a TLS session.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The client closed the connection before sending a byte: a TCP health check or port
    /// scan, not a failed handshake.
    #[error("the client closed the connection before its handshake began")]
    Silent,
    #[error("{0}")]
    Failed(#[from] io::Error),
}

/// The certificate and key files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a PEM certificate chain: {message}", path.display())]
    BadCertificate { path: PathBuf, message: String },
    #[error("{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {message}", path.display())]
    BadKey { path: PathBuf, message: String },
    #[error("the certificate and key are refused: {0}")]
    Refused(#[from] rustls::Error),
}

/// The two files as last read.
#[derive(Clone, PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Pem {
    fn read(cert: &Path, key: &Path) -> Result<Pem, LoadError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| LoadError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Pem {
            cert: read(cert)?,
            key: read(key)?,
        })
    }

    /// A server configuration for this pair: TLS 1.2 and 1.3 with ring's defaults, no client
    /// certificates, ALPN `http/1.1` only (a client that offers only `h2` is refused).
    fn server_config(&self, cert_path: &Path, key_path: &Path) -> Result<ServerConfig, LoadError> {
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LoadError::BadCertificate {
                path: cert_path.to_owned(),
                message: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(LoadError::NoCertificate {
                path: cert_path.to_owned(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| LoadError::BadKey {
            path: key_path.to_owned(),
            message: e.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Refuses a key that does not match the certificate.
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The files, as given (a Kubernetes Secret volume swaps a symlink under them: reading the
/// path follows it).
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

/// Reads and checks the certificate and key `config` names: the acceptor, and its reload
/// thread to start; `None` when it names none (TLS is off).
pub fn load(config: &TlsConfig) -> Result<Option<(Acceptor, Reload)>, LoadError> {
    let Some((cert, key)) = config.files() else {
        return Ok(None);
    };
    let files = Files {
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    let pem = Pem::read(&files.cert, &files.key)?;
    let server = pem.server_config(&files.cert, &files.key)?;
    let acceptor = Acceptor {
        current: ArcSwap::from_pointee(server),
        handshake_timeout: ms(config.handshake_timeout_ms),
    };
    let reload = Reload {
        files,
        current: pem,
        interval: ms(config.reload_interval_ms),
    };
    Ok(Some((acceptor, reload)))
}

/// The reload thread of an [`Acceptor`], not yet started.
pub struct Reload {
    files: Files,
    /// The files as loaded.
    current: Pem,
    interval: Duration,
}

impl Reload {
    pub fn spawn(self, acceptor: Arc<Acceptor>) -> io::Result<()> {
        std::thread::Builder::new()
            .name("lmstack-tls".into())
            .spawn(move || self.run(&acceptor))?;
        Ok(())
    }

    /// Reads the files every interval; a changed pair that loads replaces the
    /// configuration new connections get; one that does not is logged and counted once,
    /// and the current one stays. Content is compared, not modification times: a
    /// Kubernetes Secret volume swaps a symlink, and a file rewritten within the same
    /// second may keep its time.
    fn run(mut self, acceptor: &Acceptor) {
        let loaded = ::metrics::counter!(metrics::TLS_CERTIFICATE_RELOADS_TOTAL, "outcome" => "loaded");
        let rejected = ::metrics::counter!(metrics::TLS_CERTIFICATE_RELOADS_TOTAL, "outcome" => "rejected");
        let files = &self.files;
        // The last refused pair, or the last read error: not logged or counted again.
        let mut refused: Option<Pem> = None;
        let mut unreadable: Option<String> = None;
        loop {
            #[expect(clippy::disallowed_methods, reason = "the TLS reload thread, not a worker")]
            std::thread::sleep(self.interval);
            let pem = match Pem::read(&files.cert, &files.key) {
                Ok(pem) => pem,
                Err(e) => {
                    let message = e.to_string();
                    if unreadable.as_ref() != Some(&message) {
                        tracing::warn!("TLS certificate reload: {message}; keeping the current certificate");
                        rejected.increment(1);
                        unreadable = Some(message);
                    }
                    continue;
                }
            };
            unreadable = None;
            if pem == self.current || refused.as_ref() == Some(&pem) {
                continue;
            }
            match pem.server_config(&files.cert, &files.key) {
                Ok(server) => {
                    acceptor.current.store(Arc::new(server));
                    loaded.increment(1);
                    tracing::info!(
                        cert = %files.cert.display(),
                        "TLS certificate reloaded: new connections use it"
                    );
                    self.current = pem;
                    refused = None;
                }
                Err(e) => {
                    tracing::warn!("TLS certificate reload: {e}; keeping the current certificate");
                    rejected.increment(1);
                    refused = Some(pem);
                }
            }
        }
    }
}

impl Acceptor {
    /// Runs the server side of the handshake on `stream` within the handshake deadline.
    pub async fn accept(&self, stream: TcpStream) -> Result<(Reader, Writer), Refused> {
        let mut conn = ServerConnection::new(self.current.load_full()).map_err(io::Error::other)?;
        // Writes are bounded by what the caller hands over at once (a relayed read).
        conn.set_buffer_limit(None);
        let conn = Rc::new(RefCell::new(conn));
        let (rd, wr) = stream.into_split();
        let mut reader = Reader {
            tcp: rd,
            conn: conn.clone(),
            raw: BytesMut::new(),
        };
        let mut writer = Writer {
            tcp: wr,
            conn,
            out: Vec::new(),
        };
        match crate::time::timeout(self.handshake_timeout, handshake(&mut reader, &mut writer)).await {
            Ok(Ok(())) => Ok((reader, writer)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Refused::Failed(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no handshake within {} ms", self.handshake_timeout.as_millis()),
            ))),
        }
    }
}

async fn handshake(reader: &mut Reader, writer: &mut Writer) -> Result<(), Refused> {
    let mut began = false;
    loop {
        writer.flush().await?;
        if !reader.conn.borrow().is_handshaking() {
            return Ok(());
        }
        match reader.fill(MIN_READ, None).await {
            Ok(0) if !began => return Err(Refused::Silent),
            Ok(0) => {
                return Err(Refused::Failed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the handshake",
                )));
            }
            Ok(_) => began = true,
            Err(e) => {
                // rustls queued an alert saying why: send it, if the client still listens.
                let _ = writer.flush().await;
                return Err(e.into());
            }
        }
    }
}

/// The read half of a client's TLS connection.
pub struct Reader {
    tcp: OwnedReadHalf<TcpStream>,
    conn: Rc<RefCell<ServerConnection>>,
    /// Ciphertext read and not yet handed to rustls.
    raw: BytesMut,
}

impl Reader {
    /// Appends the plaintext one read makes available to `buf` (`want`: a hint of how much
    /// is expected). Returns the count; 0 when the client closed the connection.
    pub async fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        self.read_with(buf, want, None).await
    }

    /// [`Reader::read_into`], cancellable through `handle`: a cancelled read returns an
    /// error (or what it had read), and keeps whatever came for the next read.
    pub async fn cancelable_read_into(
        &mut self,
        buf: &mut BytesMut,
        want: usize,
        handle: CancelHandle,
    ) -> io::Result<usize> {
        self.read_with(buf, want, Some(handle)).await
    }

    async fn read_with(&mut self, buf: &mut BytesMut, want: usize, cancel: Option<CancelHandle>) -> io::Result<usize> {
        loop {
            if let Some(n) = self.take_plaintext(buf)? {
                return Ok(n);
            }
            if self.fill(want, cancel.clone()).await? == 0 {
                return Ok(0);
            }
        }
    }

    /// Moves the decrypted bytes to `buf`: `Some(n)` when there were some, `Some(0)` when the
    /// client closed the TLS session (close_notify), `None` when more must be read.
    fn take_plaintext(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        let mut conn = self.conn.borrow_mut();
        let mut plaintext = conn.reader();
        let mut n = 0;
        loop {
            let len = match plaintext.fill_buf() {
                Ok([]) => return Ok(Some(n)),
                Ok(chunk) => {
                    buf.extend_from_slice(chunk);
                    chunk.len()
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((n > 0).then_some(n)),
                Err(e) if n == 0 => return Err(e),
                Err(_) => return Ok(Some(n)),
            };
            plaintext.consume(len);
            n += len;
        }
    }

    /// Reads ciphertext from the client (once) and hands what is buffered to rustls, which
    /// decrypts it. Returns the count read; 0 when the client closed the connection.
    async fn fill(&mut self, want: usize, cancel: Option<CancelHandle>) -> io::Result<usize> {
        let want = want.clamp(MIN_READ, MAX_READ);
        let n = if self.raw.is_empty() {
            match cancel {
                Some(handle) => bufio::cancelable_read_into(&mut self.tcp, &mut self.raw, want, handle).await?,
                None => bufio::read_into(&mut self.tcp, &mut self.raw, want).await?,
            }
        } else {
            // Left over when plaintext was waiting: decrypt it before reading more.
            self.raw.len()
        };
        if n == 0 {
            return Ok(0);
        }
        let mut conn = self.conn.borrow_mut();
        while !self.raw.is_empty() {
            let mut ciphertext: &[u8] = &self.raw;
            let taken = conn.read_tls(&mut ciphertext)?;
            self.raw.advance(taken);
            let state = conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // 0: the session is closed (close_notify); the rest is never read.
            if taken == 0 || state.plaintext_bytes_to_read() >= PLAINTEXT_AHEAD {
                break;
            }
        }
        Ok(n)
    }
}

/// The write half of a client's TLS connection.
pub struct Writer {
    tcp: OwnedWriteHalf<TcpStream>,
    conn: Rc<RefCell<ServerConnection>>,
    /// Records on their way out, kept between writes.
    out: Vec<u8>,
}

impl Writer {
    /// Encrypts and writes all of `plaintext`, and gives it back.
    pub async fn write_all<T: AsRef<[u8]>>(&mut self, plaintext: T) -> (io::Result<usize>, T) {
        let len = plaintext.as_ref().len();
        let encrypted = self.conn.borrow_mut().writer().write_all(plaintext.as_ref());
        if let Err(e) = encrypted {
            return (Err(e), plaintext);
        }
        match self.flush().await {
            Ok(()) => (Ok(len), plaintext),
            Err(e) => (Err(e), plaintext),
        }
    }

    /// Sends close_notify, then half-closes the TCP connection.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.flush().await?;
        self.tcp.shutdown().await
    }

    /// Writes what rustls has to send: handshake messages, records, alerts.
    async fn flush(&mut self) -> io::Result<()> {
        loop {
            {
                let mut conn = self.conn.borrow_mut();
                while conn.wants_write() {
                    conn.write_tls(&mut self.out)?;
                }
            }
            if self.out.is_empty() {
                return Ok(());
            }
            let (res, mut out) = self.tcp.write_all(std::mem::take(&mut self.out)).await;
            res?;
            if out.capacity() <= KEEP_WRITE_CAPACITY {
                out.clear();
                self.out = out;
            }
        }
    }
}
