//! Reading into the spare capacity of a `BytesMut` with monoio's owned-buffer reads.
//!
//! monoio reads take the buffer by value; it comes back with the result. A read that is
//! dropped before it completes (a timeout) takes the buffer's contents with it, so callers
//! only drop reads when they are about to give up on the connection anyway.

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, CancelHandle, CancelableAsyncReadRent};

/// Appends what one read returns to `buf`, making room for at least `want` bytes first.
/// Returns the count read; 0 means the peer closed.
pub async fn read_into<R: AsyncReadRent>(reader: &mut R, buf: &mut BytesMut, want: usize) -> std::io::Result<usize> {
    make_room(buf, want);
    let owned = std::mem::take(buf);
    let len = owned.len();
    let (res, slice) = reader.read(owned.slice_mut(len..)).await;
    *buf = slice.into_inner();
    res
}

/// [`read_into`], cancellable through `handle`; a cancelled read returns an error and keeps
/// whatever it had read.
pub async fn cancelable_read_into<R: CancelableAsyncReadRent>(
    reader: &mut R,
    buf: &mut BytesMut,
    want: usize,
    handle: CancelHandle,
) -> std::io::Result<usize> {
    make_room(buf, want);
    let owned = std::mem::take(buf);
    let len = owned.len();
    let (res, slice) = reader.cancelable_read(owned.slice_mut(len..), handle).await;
    *buf = slice.into_inner();
    res
}

fn make_room(buf: &mut BytesMut, want: usize) {
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
}
