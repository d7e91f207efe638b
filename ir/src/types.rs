//! Element types and symbolic tensor shapes.

use std::fmt;

/// Element type of a value or parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    /// Packed 4-bit codes, two per byte (storage only).
    U4,
    I8,
}

impl DType {
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U4,
        DType::I8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::U4 => "u4",
            DType::I8 => "i8",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.name() == s)
    }

    /// Storage size of `n` elements in bytes (u4 packs two per byte, rounding up).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            DType::F32 | DType::I32 => 4 * n,
            DType::F16 | DType::BF16 => 2 * n,
            DType::I8 => n,
            DType::U4 => n.div_ceil(2),
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: a constant or a symbol bound at run time (`seq`, `past`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Const(usize),
    Sym(String),
}

impl Dim {
    pub fn sym(s: &str) -> Dim {
        Dim::Sym(s.to_string())
    }

    pub fn as_const(&self) -> Option<usize> {
        match self {
            Dim::Const(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Const(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// The type of an SSA value or a parameter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Self {
        TensorType { dtype, shape }
    }

    pub fn f32(shape: Vec<Dim>) -> Self {
        TensorType::new(DType::F32, shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// All dimensions constant: their product.
    pub fn const_numel(&self) -> Option<usize> {
        self.shape.iter().map(Dim::as_const).product()
    }

    pub fn last_dim(&self) -> Option<&Dim> {
        self.shape.last()
    }

    /// Concrete shape given values for the symbols.
    pub fn concrete(&self, bind: &dyn Fn(&str) -> Option<usize>) -> Option<Vec<usize>> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Const(n) => Some(*n),
                Dim::Sym(s) => bind(s),
            })
            .collect()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}
