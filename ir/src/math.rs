//! Numerical helpers shared by the interpreter and the vector-Jacobian products: the matmul
//! through the `gemm` crate, dot products, softmax, sigmoid and the reconstruction losses.

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// c[m,n] = a[m,k] b[k,n] with element strides (row stride, column stride) for each operand.
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
    // SAFETY: the asserts above bound every element gemm reads through the given strides; c
    // holds m*n elements and is a distinct (mutable) borrow.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0f32,
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
