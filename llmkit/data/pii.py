"""Personally identifiable information (PII) and secrets in text: find them, then redact, drop or report.

The source documents ask fine-tuning data preparation to remove "confidential information"; a pretraining crawl
holds e-mail addresses, phone numbers and leaked keys that a model can memorise and repeat (Carlini et al. 2021,
"Extracting Training Data from Large Language Models"). Each detector below is a pattern for a candidate plus, where
the format has one, a checksum that rejects look-alikes:

- EMAIL: local@domain.tld (RFC 5322's common subset: no quoted local parts, no IP-literal domains).
- PHONE: "+" and a country code then 6-14 more digits in groups ("+44 20 7946 0958", "+1-555-123-4567"), or a
  North American 3-3-4 number with separators ("(555) 123-4567", "555.123.4567"), or a national number starting with
  0 in 2-5 groups ("020 7946 0958", "030 12345678"), or a bare run of 7-15 digits right after a word that announces
  a number ("call me at 5558929", "telephone number is 8456086363"). Dates, years and other digit runs are not.
- IP: IPv4 dotted quads with every octet 0..255 (not inside a longer dotted run, not after "v"/"version": those are
  version strings), and IPv6 addresses as Python's `ipaddress` parses them.
- CREDIT_CARD: 13-19 digits, optionally in groups split by single spaces or hyphens, with an issuer prefix (Visa 4,
  Mastercard 51-55 / 2221-2720, Amex 34/37, Discover 6011/65, JCB 35, Diners 30/36/38) and a valid Luhn checksum:
  double every second digit from the right (subtracting 9 above 9); the sum is 0 mod 10.
- IBAN: a country code, 2 check digits and the BBAN, of the country's registered length (ISO 13616), whose
  mod-97 checksum is 1: move the first 4 characters to the end, letters -> 10..35, the number mod 97 == 1.
- SECRET: well-known credential shapes (AWS access key ids, GitHub / Slack / Stripe / Google / OpenAI-style keys,
  JSON Web Tokens, PEM private-key blocks).

Spans never overlap (the earliest, then the longest candidate wins), redaction replaces each with a typed
placeholder (`<EMAIL>`, `<PHONE>`, ...) that no detector matches, so redacting twice changes nothing, and text
without PII comes back byte-identical.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from llmkit.errors import LlmkitError

PII_TYPES = ("email", "phone", "ip", "credit_card", "iban", "secret")


@dataclass(frozen=True)
class PiiSpan:
    """One finding: text[start:end] is PII of `kind` (one of PII_TYPES)."""

    start: int
    end: int
    kind: str

    def placeholder(self) -> str:
        return f"<{self.kind.upper()}>"


# ---- patterns --------------------------------------------------------------------------------------------------------

_DOMAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:"
                    r"(?:" + _DOMAIN_LABEL + r"\.)+[A-Za-z]{2,24}"
                    r"|(?:" + _DOMAIN_LABEL + r"\.)*" + _DOMAIN_LABEL + r"\. (?:com|net|org|edu|gov|info|io|uk|de|fr|cn|jp)"
                    r")(?![\w-])")  # the second form: transcripts write "name@yahoo. com"
_SEP = r"[ .\-]"
# a run of digit groups ("+44 20 7946 0958 4111 1111 ..."): phone numbers and cards are read out of it group by group
_DIGIT_RUN = re.compile(r"(?<![\w+.\-])\+?(?:\(\d{1,4}\)|\d)(?:[ .\-]?(?:\(\d{1,4}\)|\d))*(?![\w])")
_GROUP_END = re.compile(r"(?<=[\d)])(?=[ .\-(]|$)")
_PHONE = re.compile(
    r"\+\d{1,3}(?:" + _SEP + r"?\(?\d{1,4}\)?){2,5}"  # international: +CC then 2-5 groups
    r"|\(\d{3}\)" + _SEP + r"?\d{3}" + _SEP + r"\d{4}"  # (555) 123-4567
    r"|\d{3}(?P<nanp>" + _SEP + r")\d{3}(?P=nanp)\d{4}"  # 555-123-4567, 555.123.4567 (one separator kind)
    r"|0\d{1,4}(?:" + _SEP + r"\d{2,8}){1,4}"  # national: 020 7946 0958, 01 23 45 67 89
)
_CARD = re.compile(r"\d(?:[ -]?\d){12,18}")
# a bare run of 7-15 digits is a phone number only right after words that announce one ("call me at 5558929")
_BARE_PHONE = re.compile(r"\+?\d(?:[ -]?\d){6,14}")
_PHONE_CONTEXT = re.compile(r"(?<!<)\b(?:phone|telephone|tel|cell|mobile|fax|call|dial|ring|reach|contact|extension|ext)"
                            r"\b(?!>)[^.\n\d]{0,40}$", re.IGNORECASE)  # not inside a placeholder such as <PHONE>
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w]|[ -]\d)")
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![\w])")
_SECRET = re.compile(
    r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )?PRIVATE KEY-----"
    r"|(?<![\w])(?:"
    r"(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{60,}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{20,}"  # Stripe
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|sk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{20,}"  # OpenAI / Anthropic style
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JSON Web Token
    r")(?![\w-])"
)
_VERSION_BEFORE = re.compile(r"(?:\b(?:v|version|ver\.?|release|build)\s*)$", re.IGNORECASE)

# ISO 13616 IBAN lengths by country (the SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
_CARD_PREFIXES = re.compile(r"4|5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6011|65|35|30|36|38")


# ---- checksums -------------------------------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of payment card numbers: from the right, double every second digit (minus 9 when the
    double exceeds 9); valid when the sum is divisible by 10."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616 / ISO 7064 mod 97-10: the registered length for the country, and with the first four characters
    moved to the end and letters read as 10..35, the number is 1 mod 97."""
    iban = iban.replace(" ", "")
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


# ---- detectors: text -> candidate spans ------------------------------------------------------------------------------


def _emails(text: str) -> Iterator[PiiSpan]:
    for match in _EMAIL.finditer(text):
        yield PiiSpan(match.start(), match.end(), "email")


def _digit_runs(text: str, accept: Callable[[str], bool]) -> Iterator[tuple[int, int]]:
    """(start, end) of the numbers `accept` takes out of each run of digit groups: at each group, the longest prefix
    ending at a group boundary that `accept`s, then on after it; a group no prefix fits is skipped."""
    for run in _DIGIT_RUN.finditer(text):
        raw, offset = run.group(), run.start()
        starts = [0] + [match.end() + 1 for match in _GROUP_END.finditer(raw) if match.end() < len(raw)]
        ends = [match.end() for match in _GROUP_END.finditer(raw)]
        position = 0
        while position < len(raw):
            end = next((end for end in reversed(ends) if end > position and accept(raw[position:end])), None)
            if end is not None:
                yield offset + position, offset + end
            following = [start for start in starts if start > (end or position)]
            if not following:
                break
            position = following[0]


def _plausible_phone(candidate: str) -> bool:
    if not _PHONE.fullmatch(candidate):
        return False
    digits = re.sub(r"\D", "", candidate)
    if candidate.startswith("+"):
        return 8 <= len(digits) <= 15
    if candidate.startswith("0"):  # national: one separator kind, and longer than a dd.mm.yyyy date
        return 9 <= len(digits) <= 12 and len(set(re.findall(r"[ .\-]", candidate))) == 1
    return True  # North American 3-3-4 (10 digits by the pattern)


def _valid_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return (bool(_CARD.fullmatch(candidate)) and len(set(re.findall(r"[ -]", candidate))) <= 1
            and bool(_CARD_PREFIXES.match(digits)) and luhn_valid(digits))


def _phones(text: str) -> Iterator[PiiSpan]:
    for start, end in _digit_runs(text, _plausible_phone):
        yield PiiSpan(start, end, "phone")
    for run in _DIGIT_RUN.finditer(text):
        if _BARE_PHONE.fullmatch(run.group()) and _PHONE_CONTEXT.search(text, max(0, run.start() - 60), run.start()):
            yield PiiSpan(run.start(), run.end(), "phone")


def _ips(text: str) -> Iterator[PiiSpan]:
    for match in _IPV4.finditer(text):
        if all(int(octet) <= 255 for octet in match.group().split(".")) and not _VERSION_BEFORE.search(
                text[max(0, match.start() - 12):match.start()]):
            yield PiiSpan(match.start(), match.end(), "ip")
    for match in _IPV6.finditer(text):
        candidate = match.group()
        groups = [group for group in re.split(r"[:.]", candidate) if group]
        if len(groups) >= 2 and sum(map(len, groups)) >= 4:  # not a slice like "[1::2]" or a bare "::"
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            yield PiiSpan(match.start(), match.end(), "ip")


def _cards(text: str) -> Iterator[PiiSpan]:
    for start, end in _digit_runs(text, _valid_card):
        yield PiiSpan(start, end, "credit_card")


def _ibans(text: str) -> Iterator[PiiSpan]:
    for match in _IBAN.finditer(text):
        # the pattern may run on into a following word of capitals and digits: take the registered length
        length = IBAN_LENGTHS.get(match.group()[:2])
        if length is None:
            continue
        end = match.start()  # advance over the registered number of non-space characters
        compact = ""
        while len(compact) < length and end < match.end():
            compact += text[end] if text[end] != " " else ""
            end += 1
        if len(compact) == length and iban_valid(compact):
            yield PiiSpan(match.start(), end, "iban")


def _secrets(text: str) -> Iterator[PiiSpan]:
    for match in _SECRET.finditer(text):
        yield PiiSpan(match.start(), match.end(), "secret")


DETECTORS: dict[str, Callable[[str], Iterator[PiiSpan]]] = {
    "email": _emails, "phone": _phones, "ip": _ips, "credit_card": _cards, "iban": _ibans, "secret": _secrets,
}
_PRIORITY = {kind: rank for rank, kind in enumerate(("secret", "email", "iban", "credit_card", "ip", "phone"))}


# ---- finding, redacting ----------------------------------------------------------------------------------------------


class PiiFinder:
    """Finds PII of the chosen `types` in text, leaving alone any finding whose text is in `allow` (compared
    case-insensitively: a project's public contact address, a documentation IP)."""

    def __init__(self, types: Iterable[str] = PII_TYPES, allow: Iterable[str] = ()) -> None:
        self.types = tuple(types)
        unknown = sorted(set(self.types) - set(PII_TYPES))
        if unknown or not self.types:
            raise LlmkitError(f"unknown PII type(s) {unknown or '(none chosen)'}: choose from {', '.join(PII_TYPES)}")
        self.allow = frozenset(item.strip().lower() for item in allow)

    def find(self, text: str) -> list[PiiSpan]:
        """Non-overlapping findings in text order: among overlapping candidates the earliest wins, then the longest,
        then the more specific type (secret > email > iban > credit_card > ip > phone)."""
        if not text:
            return []
        candidates = [span for kind in self.types for span in DETECTORS[kind](text)
                      if text[span.start:span.end].lower() not in self.allow]
        candidates.sort(key=lambda span: (span.start, span.start - span.end, _PRIORITY[span.kind]))
        chosen: list[PiiSpan] = []
        for span in candidates:
            if not chosen or span.start >= chosen[-1].end:
                chosen.append(span)
        return chosen


def redact(text: str, spans: list[PiiSpan]) -> str:
    """`text` with each span (non-overlapping, in order) replaced by its placeholder, e.g. `<EMAIL>`."""
    pieces, position = [], 0
    for span in spans:
        pieces += [text[position:span.start], span.placeholder()]
        position = span.end
    pieces.append(text[position:])
    return "".join(pieces)
