//! Topic patterns from a token's `topics` claim: exact names, or with `*` matching any run of
//! characters (`orders/*`, `*`, `chat/*/typing`). No other character is special. (A topic whose
//! name contains `*` can be granted only by a pattern, which may match more than it.)

/// Whether `name` matches `pattern`.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Greedy matching with backtracking to the last `*`: linear in practice, and never worse
    // than O(len(p) * len(n)) (both are at most 256 bytes).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::matches;
    use proptest::prelude::*;

    #[test]
    fn exact_names_and_stars() {
        assert!(matches("orders/42", "orders/42"));
        assert!(!matches("orders/42", "orders/420"));
        assert!(matches("orders/*", "orders/42"));
        assert!(matches("orders/*", "orders/"));
        assert!(!matches("orders/*", "order"));
        assert!(matches("*", "anything at all"));
        assert!(matches("chat/*/typing", "chat/room 1/typing"));
        assert!(!matches("chat/*/typing", "chat/room/typed"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        assert!(!matches("", "x"));
        assert!(matches("", ""));
    }

    proptest! {
        #[test]
        fn a_pattern_without_star_matches_only_itself(p in "[a-z/.]{0,12}", n in "[a-z/.]{0,12}") {
            prop_assert_eq!(matches(&p, &n), p == n);
        }

        #[test]
        fn prefix_star_matches_every_extension(p in "[a-z/]{0,8}", rest in "[a-z/*]{0,8}") {
            let pattern = format!("{p}*");
            let name = format!("{p}{rest}");
            prop_assert!(matches(&pattern, &name));
        }
    }
}
