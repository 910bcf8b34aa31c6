//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19): the kernel picks a
//! buffer for each multishot recv completion, so idle connections hold no receive buffer at all.
//! This is what keeps memory per idle connection small: 10^5 sockets share a few MiB.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;

use super::UringError;

/// A ring of `count` buffers of `size` bytes, registered as group `bgid`.
pub struct BufRing {
    ring: NonNull<BufRingEntry>,
    ring_bytes: usize,
    bufs: Box<[u8]>,
    size: usize,
    count: u16,
    tail: u16,
    bgid: u16,
}

impl BufRing {
    /// Allocates and registers the ring. `count` must be a power of two, at most 32768.
    ///
    /// # Panics
    ///
    /// Never in practice: only if a successful `mmap` returned a null address.
    pub fn new(ring: &IoUring, bgid: u16, count: u16, size: usize) -> Result<Self, UringError> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(UringError::Register {
                what: "buffer ring",
                source: io::Error::new(io::ErrorKind::InvalidInput, "count must be a power of two <= 32768"),
            });
        }
        let ring_bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: anonymous private mapping; the result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(UringError::Register { what: "buffer ring memory", source: io::Error::last_os_error() });
        }
        let ring_ptr = NonNull::new(addr.cast::<BufRingEntry>()).expect("mmap never returns null on success");
        let bufs = vec![0u8; usize::from(count) * size].into_boxed_slice();
        let mut this = Self { ring: ring_ptr, ring_bytes, bufs, size, count, tail: 0, bgid };
        // SAFETY: the mapping is page aligned, `count` entries long, and lives (with `bufs`)
        // until `Drop`, which the shard runs after the ring itself is dropped.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(addr as u64, count, bgid, 0)
                .map_err(|source| UringError::Register { what: "buffer ring", source })?;
        }
        for bid in 0..count {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    /// The buffer group id that recv SQEs name to draw a buffer from this ring.
    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Bytes in each buffer: the most one recv completion can deliver.
    pub fn buf_size(&self) -> usize {
        self.size
    }

    /// The bytes the kernel wrote into buffer `bid`.
    ///
    /// The buffer belongs to the caller from its completion until `recycle(bid)`.
    pub fn get_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = usize::from(bid) * self.size;
        let len = len.min(self.size);
        &mut self.bufs[start..start + len]
    }

    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.count - 1));
        let addr = self.bufs.as_ptr() as u64 + (usize::from(bid) * self.size) as u64;
        // SAFETY: `idx < count`, inside the mapping; the kernel only reads entries between its
        // head and the published tail, and this one is past the published tail.
        let entry = unsafe { &mut *self.ring.as_ptr().add(idx) };
        entry.set_addr(addr);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail shares the first entry's reserved field; it is a u16 the kernel reads
        // with acquire semantics, so the entries written above are visible before it moves.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this length; the ring that used it is gone.
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), self.ring_bytes);
        }
    }
}
