//! Working buffers shared by the convolutions of a run.
//!
//! A 512² VAE decoder pads and widens tensors of over 100 MB in each of its
//! thirty convolutions. Fresh buffers of that size are fresh mappings whose
//! pages fault in on first touch, every convolution, every run. Buffers taken
//! here go back to a small pool when the op is done, so the next convolution
//! reuses pages that are already resident; `release` empties the pool when a
//! run ends, so idle plans hold none of it.

use std::sync::Mutex;

/// Buffers kept between ops: a convolution holds at most two at once.
const POOL_SIZE: usize = 2;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` floats from the pool; its contents are unspecified
/// (stale or zero), so callers write every element they read.
pub struct Scratch(Vec<f32>);

impl Scratch {
    pub fn take(len: usize) -> Scratch {
        let mut buffer = POOL
            .lock()
            .ok()
            .and_then(|mut pool| {
                // The smallest that fits, else the largest, which grows.
                let fits = (0..pool.len())
                    .filter(|&i| pool[i].capacity() >= len)
                    .min_by_key(|&i| pool[i].capacity());
                let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
                pick.map(|i| pool.swap_remove(i))
            })
            .unwrap_or_default();
        buffer.resize(len, 0.0);
        buffer.truncate(len);
        Scratch(buffer)
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.0
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() < POOL_SIZE {
                pool.push(buffer);
            } else if let Some(smallest) = (0..pool.len()).min_by_key(|&i| pool[i].capacity()) {
                if pool[smallest].capacity() < buffer.capacity() {
                    pool[smallest] = buffer;
                }
            }
        }
    }
}

/// Frees the pooled buffers.
pub fn release() {
    if let Ok(mut pool) = POOL.lock() {
        pool.clear();
    }
}
