"""Direct constructions in json_lex against the general automaton operations they replace.

``strings_except_expr`` builds "any string but these" (an object's undeclared property names)
straight from the names' trie instead of complementing, minimizing and converting a code-point DFA.
Both must give the same grammar: the IR's minimal automata are canonical, so equal languages give
byte-identical arrays. A second test checks the language itself against Python's ``not in``.
"""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stencil.decode.parser import grammar_accepts
from stencil.grammar import json_lex as lx
from stencil.grammar.ir import GrammarBuilder, lit, seq

# Characters of every UTF-8 width, ones JSON must escape, and prefixes of one another's names.
ALPHABET = "ab_~é€😀\"\\\n\x00"
NAMES = st.lists(st.text(alphabet=ALPHABET, max_size=5), max_size=6)


def _label(ranges: lx.Ranges):
    return lx.json_char(ranges, raw_ascii=True)


def _key_grammar(key):
    b = GrammarBuilder()
    b.rule("root", seq(lit('"'), key, lit('"')))
    return b.build("root")


def _arrays(g) -> list[np.ndarray]:
    return [g.rule_start, g.state_final, g.edge_ptr, g.edge_lo, g.edge_hi, g.edge_rule, g.edge_target]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(NAMES)
def test_strings_except_builds_the_same_grammar_as_the_complemented_dfa(names):
    direct = _key_grammar(lx.strings_except_expr(names, _label))
    general = _key_grammar(lx.dfa_to_expr(lx.minimize(lx.complement(lx.strings_dfa(names))), _label))
    for a, b in zip(_arrays(direct), _arrays(general)):
        assert np.array_equal(a, b)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(NAMES, st.lists(st.text(alphabet=ALPHABET, max_size=6), min_size=1, max_size=8), st.booleans())
def test_strings_except_accepts_exactly_the_other_strings(names, probes, ensure_ascii):
    g = _key_grammar(lx.strings_except_expr(names, _label))
    for text in probes + names:
        body = json.dumps(text, ensure_ascii=ensure_ascii).encode()
        assert grammar_accepts(g, body) == (text not in names), (names, text)
