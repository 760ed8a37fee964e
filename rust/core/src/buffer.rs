//! Output buffers for large results.
//!
//! A fresh 100 MB result costs more in page faults (25,000 of them at 4 KiB) than the dequantization itself.
//! On Linux we ask for transparent huge pages on the buffer before anything touches it, so the threads that
//! fill it fault in 2 MiB at a time. Elsewhere this is a plain zeroed vector.

/// A zeroed vector of `n` elements, advised for huge pages on Linux. Zeroed allocations come straight from
/// the OS (calloc / mmap), so no page is touched before the advice is given.
pub fn zeroed_output<T: Copy + Default>(n: usize) -> Vec<T>
where
    Vec<T>: ZeroedAlloc<T>,
{
    let v = <Vec<T> as ZeroedAlloc<T>>::zeroed(n);
    advise_huge_pages(&v);
    v
}

/// Types whose all-zero bit pattern is their default, so `vec![0; n]` becomes a calloc.
pub trait ZeroedAlloc<T> {
    fn zeroed(n: usize) -> Vec<T>;
}

macro_rules! zeroed_alloc {
    ($($t:ty),*) => {$(
        impl ZeroedAlloc<$t> for Vec<$t> {
            fn zeroed(n: usize) -> Vec<$t> {
                vec![0 as $t; n]
            }
        }
    )*};
}
zeroed_alloc!(u8, u16, u32, f32);

const HUGE_PAGE: usize = 2 << 20;

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(v: &[T]) {
    let start = v.as_ptr() as usize;
    let end = start + std::mem::size_of_val(v);
    let aligned_start = start.next_multiple_of(HUGE_PAGE);
    let aligned_end = end - end % HUGE_PAGE;
    if aligned_end > aligned_start {
        // SAFETY: the range lies inside this live allocation; MADV_HUGEPAGE only changes how the kernel backs
        // it, never its contents. Failure (THP disabled) is harmless and ignored.
        unsafe {
            libc::madvise(
                aligned_start as *mut libc::c_void,
                aligned_end - aligned_start,
                libc::MADV_HUGEPAGE,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_v: &[T]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_output_is_zeroed_and_sized() {
        let v: Vec<u16> = zeroed_output(5 << 20);
        assert_eq!(v.len(), 5 << 20);
        assert!(v.iter().all(|&x| x == 0));
    }
}

/// A small cache of large output buffers, so a layer that dequantizes the same weight on every call gets
/// memory that is already mapped instead of paying the page faults again (PyTorch's CUDA caching allocator
/// plays the same role on GPUs). Buffers come back when their last user drops them. Storage is `u32` so any
/// 2- or 4-byte element type can be laid over it with the right alignment.
pub struct BufferPool {
    state: std::sync::Mutex<PoolState>,
}

struct PoolState {
    free: Vec<Vec<u32>>,
    limit_bytes: usize,
}

/// Buffers below this size are not worth caching: the allocator serves them without fresh page faults.
const POOL_MIN_BYTES: usize = 1 << 20;
const POOL_MAX_BUFFERS: usize = 8;

impl BufferPool {
    pub const fn new(limit_bytes: usize) -> Self {
        BufferPool { state: std::sync::Mutex::new(PoolState { free: Vec::new(), limit_bytes }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding the lock cannot leave the free list inconsistent, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A buffer of exactly `words` u32 words: a cached one if there is one of that size, else a fresh zeroed one.
    /// Its contents are unspecified (the caller overwrites all of it).
    pub fn take(&self, words: usize) -> Vec<u32> {
        {
            let mut state = self.lock();
            if let Some(i) = state.free.iter().position(|b| b.len() == words) {
                return state.free.swap_remove(i);
            }
        }
        zeroed_output(words)
    }

    /// Return a buffer for reuse; it is dropped instead when caching it would pass the limits.
    pub fn give(&self, buffer: Vec<u32>) {
        let bytes = buffer.len() * 4;
        if bytes < POOL_MIN_BYTES {
            return;
        }
        let mut state = self.lock();
        let held: usize = state.free.iter().map(|b| b.len() * 4).sum();
        if held + bytes <= state.limit_bytes && state.free.len() < POOL_MAX_BUFFERS {
            state.free.push(buffer);
        }
    }

    /// Change the byte limit (0 disables caching) and drop cached buffers beyond it.
    pub fn set_limit(&self, limit_bytes: usize) {
        let mut state = self.lock();
        state.limit_bytes = limit_bytes;
        let mut held = 0;
        state.free.retain(|b| {
            held += b.len() * 4;
            held <= limit_bytes
        });
    }

    /// (buffers cached, bytes cached, byte limit)
    pub fn stats(&self) -> (usize, usize, usize) {
        let state = self.lock();
        (state.free.len(), state.free.iter().map(|b| b.len() * 4).sum(), state.limit_bytes)
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn pool_reuses_buffers_of_the_same_size_within_its_limits() {
        let pool = BufferPool::new(16 << 20);
        let a = pool.take(1 << 20);
        let ptr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.stats().0, 1);
        let b = pool.take(1 << 20);
        assert_eq!(b.as_ptr(), ptr, "the cached buffer is handed out again");
        assert_eq!(pool.stats().0, 0);
        pool.give(vec![0u32; 100]); // too small to cache
        assert_eq!(pool.stats().0, 0);
        pool.give(vec![0u32; 5 << 20]); // 20 MiB: over the 16 MiB limit
        assert_eq!(pool.stats().0, 0);
        pool.give(b);
        pool.set_limit(0);
        assert_eq!(pool.stats(), (0, 0, 0));
    }
}
