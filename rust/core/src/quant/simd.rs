//! Run-time choice of instruction set: the same Rust code, compiled once per target feature set.
//!
//! The kernels are plain loops marked `#[inline(always)]`; calling one inside a function compiled with AVX2 or
//! AVX-512 enabled lets the compiler vectorize it for that set, and the CPU check picks the widest available.

/// Run `kernel` compiled for the widest instruction set this CPU offers. `wide` allows AVX-512, which pays
/// off for the compare-heavy quantizer but not for the lookup-bound dequantizer.
#[inline(always)]
pub(crate) fn dispatch<R>(wide: bool, kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if wide && std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU supports AVX-512 F and BW, checked just above.
            return unsafe { with_avx512(kernel) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { with_avx2(kernel) };
        }
    }
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn with_avx512<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn with_avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}
