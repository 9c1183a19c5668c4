//! Register contents to property values and back, the way KubeEdge's Modbus mapper reads them.
//!
//! Registers arrive as 16-bit words, which are laid out big-endian (as on the wire). Then
//! `isRegisterSwap` reverses the order of the words and `isSwap` swaps the two bytes inside each
//! word, and the bytes are read big-endian as the property's type: an unsigned integer of 1, 2
//! or 4 registers (INT), an IEEE 754 single of 2 registers (FLOAT), a double of 4 (DOUBLE), a
//! non-zero register (BOOLEAN), or UTF-8 text with trailing NULs dropped (STRING). The value is
//! multiplied by `scale` (0 means 1). An INT is then truncated toward zero as KubeEdge does, but
//! a product within 1e-9 of an integer counts as that integer, so `57 × 0.01 × 100` artefacts do
//! not lose a unit; FLOAT and DOUBLE are written with six decimals, as KubeEdge writes them.
//!
//! Coils and discrete inputs are bits: a BOOLEAN is the first bit, an INT the bits read as an
//! unsigned integer, the first bit lowest (the same as KubeEdge for up to 8 bits).
//!
//! Writing inverts all of it: the desired value divided by `scale` (rounded to the nearest
//! integer for an INT), encoded in `limit` registers, swapped the same way (both swaps are their
//! own inverse).

use std::fmt;

/// One of Modbus's four tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    Coil,
    DiscreteInput,
    Holding,
    Input,
}

impl Register {
    /// KubeEdge's names: `CoilRegister`, `DiscreteInputRegister`, `HoldingRegister`,
    /// `InputRegister`.
    pub fn parse(name: &str) -> Option<Register> {
        match name {
            "CoilRegister" => Some(Register::Coil),
            "DiscreteInputRegister" => Some(Register::DiscreteInput),
            "HoldingRegister" => Some(Register::Holding),
            "InputRegister" => Some(Register::Input),
            _ => None,
        }
    }

    /// Whether the table holds bits (coils, discrete inputs) rather than 16-bit words.
    pub fn holds_bits(self) -> bool {
        matches!(self, Register::Coil | Register::DiscreteInput)
    }

    /// Whether a client can write it (coils and holding registers).
    pub fn is_writable(self) -> bool {
        matches!(self, Register::Coil | Register::Holding)
    }
}

impl fmt::Display for Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Register::Coil => "CoilRegister",
            Register::DiscreteInput => "DiscreteInputRegister",
            Register::Holding => "HoldingRegister",
            Register::Input => "InputRegister",
        })
    }
}

/// A DeviceModel property's `type`, as far as a Modbus register can hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Int,
    Float,
    Double,
    Boolean,
    String,
}

impl ValueType {
    /// KubeEdge's names, in any case (`INT`, `int`, ...). BYTES and STREAM are not register
    /// types and are refused.
    pub fn parse(name: &str) -> Option<ValueType> {
        match name.to_ascii_lowercase().as_str() {
            "int" => Some(ValueType::Int),
            "float" => Some(ValueType::Float),
            "double" => Some(ValueType::Double),
            "boolean" => Some(ValueType::Boolean),
            "string" => Some(ValueType::String),
            _ => None,
        }
    }

    /// The name reported in a twin's `metadata.type` (KubeEdge's lowercase).
    pub fn metadata_name(self) -> &'static str {
        match self {
            ValueType::Int => "int",
            ValueType::Float => "float",
            ValueType::Double => "double",
            ValueType::Boolean => "boolean",
            ValueType::String => "string",
        }
    }

    /// How many registers (or bits) a visitor without `limit` reads.
    pub fn default_limit(self) -> u16 {
        match self {
            ValueType::Float => 2,
            ValueType::Double => 4,
            ValueType::Int | ValueType::Boolean | ValueType::String => 1,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.metadata_name())
    }
}

/// Where a property lives on the device and how its registers are read (a visitor's
/// `configData`).
#[derive(Debug, Clone, PartialEq)]
pub struct Visitor {
    pub register: Register,
    /// The first register or bit (0-based, as on the wire).
    pub offset: u16,
    /// How many registers or bits.
    pub limit: u16,
    /// Multiplies what is read; never 0 (0 in a manifest means 1).
    pub scale: f64,
    /// Swap the two bytes of each register.
    pub swap: bool,
    /// Reverse the order of the registers.
    pub register_swap: bool,
}

/// What a read returned or a write sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    Bits(Vec<bool>),
    Words(Vec<u16>),
}

/// Why contents cannot be a value of the type, or a value cannot be written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("type {value_type} cannot be read from {count} registers (want {want})")]
    WrongLength {
        value_type: ValueType,
        count: usize,
        want: &'static str,
    },
    #[error("type {value_type} cannot be held in a {register}")]
    Unsupported {
        value_type: ValueType,
        register: Register,
    },
    #[error("{register} is read-only")]
    ReadOnly { register: Register },
    #[error("{value:?} is not of type {value_type}")]
    NotAValue {
        value: String,
        value_type: ValueType,
    },
    #[error("{value:?} does not fit in {limit} {unit} (after scale {scale})")]
    OutOfRange {
        value: String,
        limit: u16,
        unit: &'static str,
        scale: f64,
    },
    #[error("the device returned {got} values for {limit} requested")]
    ShortRead { got: usize, limit: u16 },
}

/// The value `contents` hold, as the string a twin reports.
pub fn decode(
    visitor: &Visitor,
    value_type: ValueType,
    contents: &Contents,
) -> Result<String, CodecError> {
    match contents {
        Contents::Bits(bits) => decode_bits(visitor, value_type, bits),
        Contents::Words(words) => decode_words(visitor, value_type, words),
    }
}

fn decode_bits(
    visitor: &Visitor,
    value_type: ValueType,
    bits: &[bool],
) -> Result<String, CodecError> {
    let Some(first) = bits.first() else {
        return Err(CodecError::ShortRead {
            got: 0,
            limit: visitor.limit,
        });
    };
    match value_type {
        ValueType::Boolean => Ok(first.to_string()),
        ValueType::Int => {
            if bits.len() > 64 {
                return Err(CodecError::WrongLength {
                    value_type,
                    count: bits.len(),
                    want: "at most 64 bits",
                });
            }
            let raw = bits
                .iter()
                .enumerate()
                .fold(0u64, |acc, (i, bit)| acc | (u64::from(*bit) << i));
            Ok(scaled_int(raw, visitor.scale))
        }
        other => Err(CodecError::Unsupported {
            value_type: other,
            register: visitor.register,
        }),
    }
}

fn decode_words(
    visitor: &Visitor,
    value_type: ValueType,
    words: &[u16],
) -> Result<String, CodecError> {
    let bytes = swapped_bytes(visitor, words);
    let wrong_length = |want| CodecError::WrongLength {
        value_type,
        count: words.len(),
        want,
    };
    match value_type {
        ValueType::Int => {
            let raw = match bytes.len() {
                2 | 4 | 8 => bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
                _ => return Err(wrong_length("1, 2 or 4")),
            };
            Ok(scaled_int(raw, visitor.scale))
        }
        ValueType::Float => {
            let array: [u8; 4] = bytes.try_into().map_err(|_| wrong_length("2"))?;
            let value = f64::from(f32::from_be_bytes(array)) * visitor.scale;
            Ok(format!("{value:.6}"))
        }
        ValueType::Double => {
            let array: [u8; 8] = bytes.try_into().map_err(|_| wrong_length("4"))?;
            let value = f64::from_be_bytes(array) * visitor.scale;
            Ok(format!("{value:.6}"))
        }
        ValueType::Boolean => Ok(words.iter().any(|w| *w != 0).to_string()),
        ValueType::String => {
            let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |at| at + 1);
            Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
        }
    }
}

/// The words' bytes, big-endian, with the visitor's swaps applied.
fn swapped_bytes(visitor: &Visitor, words: &[u16]) -> Vec<u8> {
    let mut ordered = words.to_vec();
    if visitor.register_swap {
        ordered.reverse();
    }
    ordered
        .iter()
        .flat_map(|w| {
            let bytes = w.to_be_bytes();
            if visitor.swap {
                [bytes[1], bytes[0]]
            } else {
                bytes
            }
        })
        .collect()
}

/// Bytes back into words, undoing the visitor's swaps (each swap is its own inverse).
fn unswapped_words(visitor: &Visitor, bytes: &[u8]) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|pair| {
            let (hi, lo) = (pair[0], pair.get(1).copied().unwrap_or(0));
            if visitor.swap {
                u16::from_be_bytes([lo, hi])
            } else {
                u16::from_be_bytes([hi, lo])
            }
        })
        .collect();
    if visitor.register_swap {
        words.reverse();
    }
    words
}

/// `raw × scale` as an integer string: exact when the scale is 1, else truncated toward zero
/// (KubeEdge's conversion) unless within 1e-9 of an integer.
fn scaled_int(raw: u64, scale: f64) -> String {
    if scale == 1.0 {
        return raw.to_string();
    }
    let product = raw as f64 * scale;
    let nearest = product.round();
    let integer = if (product - nearest).abs() < 1e-9 {
        nearest
    } else {
        product.trunc()
    };
    format!("{}", integer as i64)
}

/// What to write so that the device holds `value`.
pub fn encode(
    visitor: &Visitor,
    value_type: ValueType,
    value: &str,
) -> Result<Contents, CodecError> {
    if !visitor.register.is_writable() {
        return Err(CodecError::ReadOnly {
            register: visitor.register,
        });
    }
    let not_a_value = || CodecError::NotAValue {
        value: value.to_string(),
        value_type,
    };
    let out_of_range = |unit| CodecError::OutOfRange {
        value: value.to_string(),
        limit: visitor.limit,
        unit,
        scale: visitor.scale,
    };
    let number = || value.trim().parse::<f64>().map_err(|_| not_a_value());
    if visitor.register.holds_bits() {
        return match value_type {
            ValueType::Boolean => Ok(Contents::Bits(vec![
                parse_bool(value).ok_or_else(not_a_value)?,
            ])),
            ValueType::Int => {
                let raw =
                    unscaled_int(number()?, visitor.scale).ok_or_else(|| out_of_range("bits"))?;
                let limit = u32::from(visitor.limit.clamp(1, 64));
                if limit < 64 && raw >> limit != 0 {
                    return Err(out_of_range("bits"));
                }
                Ok(Contents::Bits(
                    (0..limit).map(|i| raw >> i & 1 == 1).collect(),
                ))
            }
            other => Err(CodecError::Unsupported {
                value_type: other,
                register: visitor.register,
            }),
        };
    }
    let limit = usize::from(visitor.limit);
    let bytes: Vec<u8> = match value_type {
        ValueType::Int => {
            if !matches!(limit, 1 | 2 | 4) {
                return Err(CodecError::WrongLength {
                    value_type,
                    count: limit,
                    want: "1, 2 or 4",
                });
            }
            let raw =
                unscaled_int(number()?, visitor.scale).ok_or_else(|| out_of_range("registers"))?;
            let width = limit * 2;
            if width < 8 && raw >> (width * 8) != 0 {
                return Err(out_of_range("registers"));
            }
            raw.to_be_bytes()[8 - width..].to_vec()
        }
        ValueType::Float => {
            if limit != 2 {
                return Err(CodecError::WrongLength {
                    value_type,
                    count: limit,
                    want: "2",
                });
            }
            let unscaled = (number()? / visitor.scale) as f32;
            if !unscaled.is_finite() {
                return Err(out_of_range("registers"));
            }
            unscaled.to_be_bytes().to_vec()
        }
        ValueType::Double => {
            if limit != 4 {
                return Err(CodecError::WrongLength {
                    value_type,
                    count: limit,
                    want: "4",
                });
            }
            (number()? / visitor.scale).to_be_bytes().to_vec()
        }
        ValueType::Boolean => {
            let mut bytes = vec![0; limit.max(1) * 2];
            if parse_bool(value).ok_or_else(not_a_value)?
                && let Some(last) = bytes.last_mut()
            {
                *last = 1;
            }
            bytes
        }
        ValueType::String => {
            let width = limit * 2;
            if value.len() > width {
                return Err(out_of_range("registers"));
            }
            let mut bytes = value.as_bytes().to_vec();
            bytes.resize(width, 0);
            bytes
        }
    };
    Ok(Contents::Words(unswapped_words(visitor, &bytes)))
}

/// `value / scale` rounded to the nearest non-negative integer, or `None` if it is not one.
fn unscaled_int(value: f64, scale: f64) -> Option<u64> {
    let raw = (value / scale).round();
    (0.0..18_446_744_073_709_551_616.0)
        .contains(&raw)
        .then_some(raw as u64)
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "on" => Some(true),
        "false" | "0" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(limit: u16) -> Visitor {
        Visitor {
            register: Register::Holding,
            offset: 0,
            limit,
            scale: 1.0,
            swap: false,
            register_swap: false,
        }
    }

    #[test]
    fn registers_decode_with_scale_and_swaps() {
        let words = |w: &[u16]| Contents::Words(w.to_vec());
        let cases: Vec<(Visitor, ValueType, Contents, &str)> = vec![
            (holding(1), ValueType::Int, words(&[42]), "42"),
            (holding(1), ValueType::Int, words(&[0xffff]), "65535"),
            (
                Visitor {
                    scale: 0.1,
                    ..holding(1)
                },
                ValueType::Int,
                words(&[235]),
                "23",
            ),
            (
                Visitor {
                    scale: 0.01,
                    ..holding(1)
                },
                ValueType::Int,
                words(&[5700]),
                "57",
            ),
            (
                Visitor {
                    scale: 10.0,
                    ..holding(1)
                },
                ValueType::Int,
                words(&[7]),
                "70",
            ),
            // Two registers, big-endian: 0x0001_0002.
            (holding(2), ValueType::Int, words(&[1, 2]), "65538"),
            // isRegisterSwap: the low word first.
            (
                Visitor {
                    register_swap: true,
                    ..holding(2)
                },
                ValueType::Int,
                words(&[2, 1]),
                "65538",
            ),
            // isSwap: bytes swapped inside the register.
            (
                Visitor {
                    swap: true,
                    ..holding(1)
                },
                ValueType::Int,
                words(&[0x3412]),
                "4660",
            ),
            // 23.5f32 is 0x41BC_0000.
            (
                holding(2),
                ValueType::Float,
                words(&[0x41bc, 0]),
                "23.500000",
            ),
            (
                Visitor {
                    register_swap: true,
                    swap: true,
                    ..holding(2)
                },
                ValueType::Float,
                words(&[0x0000, 0xbc41]),
                "23.500000",
            ),
            (
                Visitor {
                    scale: 2.0,
                    ..holding(2)
                },
                ValueType::Float,
                words(&[0x41bc, 0]),
                "47.000000",
            ),
            // 1.25f64 is 0x3FF4_0000_0000_0000.
            (
                holding(4),
                ValueType::Double,
                words(&[0x3ff4, 0, 0, 0]),
                "1.250000",
            ),
            (holding(1), ValueType::Boolean, words(&[1]), "true"),
            (holding(1), ValueType::Boolean, words(&[0]), "false"),
            (
                holding(2),
                ValueType::String,
                words(&[0x4142, 0x4300]),
                "ABC",
            ),
            (
                Visitor {
                    swap: true,
                    ..holding(2)
                },
                ValueType::String,
                words(&[0x4241, 0x0043]),
                "ABC",
            ),
        ];
        for (visitor, value_type, contents, want) in cases {
            assert_eq!(
                decode(&visitor, value_type, &contents).as_deref(),
                Ok(want),
                "{visitor:?} {value_type} {contents:?}"
            );
        }
    }

    #[test]
    fn coils_decode_as_booleans_and_integers() {
        let coil = Visitor {
            register: Register::Coil,
            ..holding(1)
        };
        let bits = |b: &[bool]| Contents::Bits(b.to_vec());
        assert_eq!(
            decode(&coil, ValueType::Boolean, &bits(&[true])).as_deref(),
            Ok("true")
        );
        assert_eq!(
            decode(&coil, ValueType::Int, &bits(&[true])).as_deref(),
            Ok("1")
        );
        let three = Visitor {
            limit: 3,
            ..coil.clone()
        };
        assert_eq!(
            decode(&three, ValueType::Int, &bits(&[false, true, true])).as_deref(),
            Ok("6")
        );
        assert!(matches!(
            decode(&coil, ValueType::Float, &bits(&[true])),
            Err(CodecError::Unsupported { .. })
        ));
    }

    #[test]
    fn lengths_that_cannot_hold_the_type_are_refused() {
        let err = decode(&holding(3), ValueType::Int, &Contents::Words(vec![0, 0, 0]))
            .expect_err("3 registers");
        assert_eq!(
            err.to_string(),
            "type int cannot be read from 3 registers (want 1, 2 or 4)"
        );
        assert!(decode(&holding(1), ValueType::Float, &Contents::Words(vec![0])).is_err());
        assert!(decode(&holding(2), ValueType::Double, &Contents::Words(vec![0, 0])).is_err());
    }

    #[test]
    fn values_encode_to_what_decodes_back() {
        let cases: Vec<(Visitor, ValueType, &str, Contents)> = vec![
            (holding(1), ValueType::Int, "42", Contents::Words(vec![42])),
            (
                Visitor {
                    scale: 10.0,
                    ..holding(1)
                },
                ValueType::Int,
                "70",
                Contents::Words(vec![7]),
            ),
            (
                holding(2),
                ValueType::Int,
                "65538",
                Contents::Words(vec![1, 2]),
            ),
            (
                Visitor {
                    register_swap: true,
                    ..holding(2)
                },
                ValueType::Int,
                "65538",
                Contents::Words(vec![2, 1]),
            ),
            (
                Visitor {
                    swap: true,
                    ..holding(1)
                },
                ValueType::Int,
                "4660",
                Contents::Words(vec![0x3412]),
            ),
            (
                holding(2),
                ValueType::Float,
                "23.5",
                Contents::Words(vec![0x41bc, 0]),
            ),
            (
                Visitor {
                    register_swap: true,
                    swap: true,
                    ..holding(2)
                },
                ValueType::Float,
                "23.5",
                Contents::Words(vec![0, 0xbc41]),
            ),
            (
                holding(4),
                ValueType::Double,
                "1.25",
                Contents::Words(vec![0x3ff4, 0, 0, 0]),
            ),
            (
                holding(1),
                ValueType::Boolean,
                "true",
                Contents::Words(vec![1]),
            ),
            (
                holding(2),
                ValueType::String,
                "ABC",
                Contents::Words(vec![0x4142, 0x4300]),
            ),
            (
                Visitor {
                    register: Register::Coil,
                    ..holding(1)
                },
                ValueType::Boolean,
                "true",
                Contents::Bits(vec![true]),
            ),
            (
                Visitor {
                    register: Register::Coil,
                    ..holding(3)
                },
                ValueType::Int,
                "6",
                Contents::Bits(vec![false, true, true]),
            ),
        ];
        for (visitor, value_type, value, want) in cases {
            let contents = encode(&visitor, value_type, value).expect(value);
            assert_eq!(contents, want, "{visitor:?} {value_type} {value}");
            let back = decode(&visitor, value_type, &contents).expect("decodes");
            let again = encode(&visitor, value_type, &back).expect("re-encodes");
            assert_eq!(again, contents, "{value} read back as {back}");
        }
    }

    #[test]
    fn a_fractional_scale_writes_the_fraction_and_reads_it_truncated() {
        // KubeEdge's INT is truncated after scaling: 235 × 0.1 reads as 23.
        let tenths = Visitor {
            scale: 0.1,
            ..holding(1)
        };
        assert_eq!(
            encode(&tenths, ValueType::Int, "23.5"),
            Ok(Contents::Words(vec![235]))
        );
        assert_eq!(
            decode(&tenths, ValueType::Int, &Contents::Words(vec![235])).as_deref(),
            Ok("23")
        );
        // A FLOAT keeps it.
        let float = Visitor {
            scale: 0.5,
            ..holding(2)
        };
        let contents = encode(&float, ValueType::Float, "23.5").expect("encodes");
        assert_eq!(
            decode(&float, ValueType::Float, &contents).as_deref(),
            Ok("23.500000")
        );
    }

    #[test]
    fn values_that_cannot_be_written_are_named() {
        let input = Visitor {
            register: Register::Input,
            ..holding(1)
        };
        assert_eq!(
            encode(&input, ValueType::Int, "1")
                .expect_err("read-only")
                .to_string(),
            "InputRegister is read-only"
        );
        assert_eq!(
            encode(&holding(1), ValueType::Int, "hot")
                .expect_err("not a number")
                .to_string(),
            "\"hot\" is not of type int"
        );
        assert!(matches!(
            encode(&holding(1), ValueType::Int, "65536"),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&holding(1), ValueType::Int, "-1"),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&holding(1), ValueType::String, "ABC"),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(encode(&holding(1), ValueType::Float, "1.5").is_err());
    }

    #[test]
    fn type_and_register_names_are_kubeedges() {
        assert_eq!(ValueType::parse("INT"), Some(ValueType::Int));
        assert_eq!(ValueType::parse("boolean"), Some(ValueType::Boolean));
        assert_eq!(ValueType::parse("BYTES"), None);
        for name in [
            "CoilRegister",
            "DiscreteInputRegister",
            "HoldingRegister",
            "InputRegister",
        ] {
            assert_eq!(
                Register::parse(name).map(|r| r.to_string()).as_deref(),
                Some(name)
            );
        }
        assert_eq!(Register::parse("holding"), None);
    }
}
