//! Datagram buffers the direct send path reuses.
//!
//! Every forwarded packet needs a buffer per viewer. Fresh ones cost an
//! allocation and zeroing each (~3 % of the edge's CPU at 500 viewers in `perf`)
//! and come cold from memory. The driver hands each buffer back once the kernel
//! has copied it ([`crate::Sfu::recycle`]), and the next packet takes it as it was
//! left: shortened or lengthened to the new size, never cleared, because the
//! sealer writes every byte of it ([`crate::srtp_seal::SrtpSealer::seal_into`]).

/// The capacity a new buffer gets: any RTP packet this SFU forwards fits, so
/// every pooled buffer serves every packet.
pub const BUF_CAPACITY: usize = 1500;

/// Free buffers, most recently returned first (the ones still in cache).
#[derive(Debug, Default)]
pub struct BufPool {
    free: Vec<Vec<u8>>,
    max: usize,
}

impl BufPool {
    /// A pool keeping at most `max` idle buffers (the driver's send rounds return a
    /// few hundred at a time; more would only hold memory).
    pub fn new(max: usize) -> Self {
        BufPool {
            free: Vec::with_capacity(max),
            max,
        }
    }

    /// A buffer of exactly `len` bytes with unspecified contents (an earlier
    /// packet's, or zeros): the caller overwrites all of it.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        match self.free.pop() {
            Some(mut b) => {
                if b.len() >= len {
                    b.truncate(len);
                } else {
                    b.resize(len, 0);
                }
                b
            }
            None => {
                let mut b = Vec::with_capacity(len.max(BUF_CAPACITY));
                b.resize(len, 0);
                b
            }
        }
    }

    /// Takes a sent buffer back, if it is big enough to serve any packet and the
    /// pool is not full (otherwise it is freed).
    pub fn give(&mut self, b: Vec<u8>) {
        if b.capacity() >= BUF_CAPACITY && self.free.len() < self.max {
            self.free.push(b);
        }
    }

    /// Idle buffers held.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_reused_at_the_new_size() {
        let mut p = BufPool::new(2);
        let mut a = p.take(1228);
        assert_eq!(a.len(), 1228);
        assert!(a.capacity() >= BUF_CAPACITY);
        a.fill(0xAA);
        let ptr = a.as_ptr();
        p.give(a);
        assert_eq!(p.idle(), 1);
        let b = p.take(300);
        assert_eq!(
            (b.as_ptr(), b.len()),
            (ptr, 300),
            "same allocation, shortened"
        );
        p.give(b);
        let c = p.take(1400);
        assert_eq!(
            (c.as_ptr(), c.len()),
            (ptr, 1400),
            "same allocation, lengthened"
        );
        assert_eq!(p.idle(), 0);
    }

    #[test]
    fn small_buffers_and_a_full_pool_free_what_they_get() {
        let mut p = BufPool::new(1);
        p.give(Vec::with_capacity(64));
        assert_eq!(p.idle(), 0, "too small to serve every packet");
        p.give(vec![0; BUF_CAPACITY]);
        p.give(vec![0; BUF_CAPACITY]);
        assert_eq!(p.idle(), 1, "bounded");
    }
}
