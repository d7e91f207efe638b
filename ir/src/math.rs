//! Numerical helpers shared by the interpreter and the vector-Jacobian products: the matmul
//! through the `gemm` crate, dot products, softmax, sigmoid and the reconstruction losses.

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The longest stretch of the inner dimension one `gemm` call sums.
///
/// The `gemm` crate sums the inner dimension in blocks whose length it derives from the
/// host's cache sizes (at least 512, or the whole of it when shorter), so the same product
/// rounds differently from one machine to another, and so did calibration. Calls of at most
/// `MATMUL_KC` are one block on every host: each output is then a chain of fused multiply-adds
/// in index order per chunk, the chunks added in order, whatever the machine (x86-64 with
/// AVX2 and FMA, where the crate runs the same micro-kernels) and the thread count (threads
/// split rows and columns, never the inner dimension).
pub const MATMUL_KC: usize = 512;

/// c[m,n] = a[m,k] b[k,n] with element strides (row stride, column stride) for each operand.
/// The same bits on every host: see [`MATMUL_KC`].
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    c: &mut [f32],
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    c[..m * n].fill(0.0);
    if k == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, cc: usize| (r - 1) * rs + (cc - 1) * cs;
    assert!(a.len() > last(a_rs, a_cs, m, k) && b.len() > last(b_rs, b_cs, k, n));
    assert!(c.len() >= m * n);
    // equal chunks of at most MATMUL_KC, a function of k alone
    let chunks = k.div_ceil(MATMUL_KC);
    let kc = k.div_ceil(chunks);
    let mut k0 = 0;
    while k0 < k {
        let kb = kc.min(k - k0);
        // SAFETY: the asserts above bound every element gemm reads through the given
        // strides (the chunk's first element offset by k0 along k, kb <= k - k0 more); c
        // holds m*n elements and is a distinct (mutable) borrow.
        unsafe {
            gemm::gemm(
                m,
                n,
                kb,
                c.as_mut_ptr(),
                1,
                n as isize,
                // the first chunk writes c, the others add to it
                k0 > 0,
                a.as_ptr().add(k0 * a_cs),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr().add(k0 * b_rs),
                b_cs as isize,
                b_rs as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                },
            );
        }
        k0 += kb;
    }
}

/// The orthonormal Walsh-Hadamard transform of each block of `block` values of `x` in place
/// (`block` a power of two dividing `x.len()`): the butterflies of the fast transform in the
/// usual order (strides 1, 2, 4, ..), then the scale 1/sqrt(block). The matrix is symmetric
/// and its own inverse. The K/V rotation (`rope {rotate}`) of every back end computes it in
/// this order.
pub fn hadamard_in_place(x: &mut [f32], block: usize) {
    debug_assert!(block.is_power_of_two() && x.len().is_multiple_of(block));
    let scale = (1.0 / (block as f64).sqrt()) as f32;
    for b in x.chunks_exact_mut(block) {
        let mut h = 1;
        while h < block {
            for i in (0..block).step_by(2 * h) {
                for j in i..i + h {
                    let (u, v) = (b[j], b[j + h]);
                    b[j] = u + v;
                    b[j + h] = u - v;
                }
            }
            h *= 2;
        }
        for v in b.iter_mut() {
            *v *= scale;
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax_in_place(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

/// Dot product with 8 independent accumulators (vectorisable).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The loss value, accumulated in f64.
pub fn loss_value(kind: &str, p: &[f32], t: &[f32]) -> f32 {
    let n = p.len().max(1) as f64;
    let s: f64 = p
        .iter()
        .zip(t)
        .map(|(&a, &b)| {
            let d = (a - b) as f64;
            if kind == "mse" { d * d } else { d.abs() }
        })
        .sum();
    (s / n) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast transform equals the Sylvester matrix (entry (i, j) = (-1)^popcount(i & j)
    /// / sqrt(b)), block by block; applied twice it gives the input back (symmetric,
    /// orthonormal).
    #[test]
    fn hadamard_is_the_orthonormal_sylvester_matrix() {
        for b in [2usize, 4, 8, 64, 128] {
            let x: Vec<f32> = (0..3 * b)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let mut y = x.clone();
            hadamard_in_place(&mut y, b);
            for (blk, (xb, yb)) in x.chunks(b).zip(y.chunks(b)).enumerate() {
                for (i, &got) in yb.iter().enumerate() {
                    let want: f64 = (0..b)
                        .map(|j| {
                            let sign = if (i & j).count_ones() % 2 == 0 {
                                1.0
                            } else {
                                -1.0
                            };
                            sign * xb[j] as f64
                        })
                        .sum::<f64>()
                        / (b as f64).sqrt();
                    // log2(b) rounded additions and one scale, each within half an ulp of
                    // a partial sum no larger than sum |x|
                    let bound = (b.ilog2() + 1) as f64
                        * f32::EPSILON as f64
                        * xb.iter().map(|v| v.abs() as f64).sum::<f64>();
                    assert!(
                        (got as f64 - want).abs() <= bound,
                        "b {b} block {blk} row {i}: {got} vs {want}"
                    );
                }
            }
            hadamard_in_place(&mut y, b);
            for (a, c) in x.iter().zip(&y) {
                assert!((a - c).abs() <= 1e-5 * (1.0 + a.abs()), "b {b}: {a} -> {c}");
            }
        }
    }

    /// `matmul` is, output by output, a chain of fused multiply-adds in index order over
    /// each chunk of at most `MATMUL_KC`, the chunks added in order: a definition that does
    /// not depend on the host's caches (the `gemm` crate's own blocking does) or the thread
    /// count. Checked bit for bit against that definition, written out in scalar code, for
    /// inner dimensions below, at and above one chunk, both operand layouts, 1 and 2 threads.
    /// (Products of one row or column, or of at most 16 x 16 outputs, take the crate's
    /// matrix-vector and dot-product paths: SIMD lanes along the inner dimension, another
    /// order fixed by the shape, not covered here.)
    #[test]
    fn matmul_sums_each_chunk_in_order_whatever_the_host() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("skipped: the gemm crate's AVX2/FMA kernels are the defined ones");
            return;
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (m, n, k) in [
            (9usize, 33usize, 300usize),
            (64, 48, 512),
            (70, 65, 1100),
            (17, 19, 2048),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let chunks = k.div_ceil(MATMUL_KC);
            let kc = k.div_ceil(chunks);
            // b as [k, n] row-major, or as [n, k] (a transposed weight, as `linear` passes it)
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (bm, bs) in [(&b, (n, 1)), (&bt, (1, k))] {
                for threads in [1, 2] {
                    let mut c = vec![0f32; m * n];
                    matmul(m, n, k, &a, (k, 1), bm, bs, &mut c, threads);
                    for i in 0..m {
                        for j in 0..n {
                            let mut want = 0f32;
                            for k0 in (0..k).step_by(kc) {
                                let mut acc = 0f32;
                                for t in k0..(k0 + kc).min(k) {
                                    acc = a[i * k + t].mul_add(b[t * n + j], acc);
                                }
                                want += acc;
                            }
                            assert_eq!(
                                c[i * n + j].to_bits(),
                                want.to_bits(),
                                "m {m} n {n} k {k} threads {threads} at ({i},{j}): {} vs {want}",
                                c[i * n + j]
                            );
                        }
                    }
                }
            }
        }
    }
}
