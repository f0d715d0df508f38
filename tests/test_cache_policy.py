"""RFC 9111 / RFC 5861 rules of the pure cache policy."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge.cache.policy import (
    DELTA_SECONDS_MAX,
    HEURISTIC_CAP,
    NO_DIRECTIVES,
    STALE_MAX_STALE,
    STALE_WHILE_REVALIDATE,
    CacheControl,
    Freshness,
    Use,
    compute_freshness,
    decide,
    format_http_date,
    invalidation_targets,
    merge_not_modified,
    not_modified,
    not_modified_applies,
    parse_cache_control,
    parse_etags,
    parse_http_date,
    response_meta,
    split_directives,
    stable_until,
    storable,
    stored_headers,
    targeted_cache_control,
    targeted_fields,
    uncacheable_reason,
    upstream_request_headers,
    upstream_validators,
    usable_on_error,
    without_fields,
    worth_storing,
)
from meridian.config import CacheRule

NOW = 1_700_000_000.0
RULE = CacheRule(path_prefix="/")
TICKER = CacheRule(path_prefix="/t/", ttl=1.0, stale_while_revalidate=2.0, stale_if_error=60.0)


def date(offset: float = 0.0) -> bytes:
    return format_http_date(NOW + offset)


def fresh(
    headers: list[tuple[bytes, bytes]],
    status: int = 200,
    rule: CacheRule = RULE,
    request_time: float = NOW,
    response_time: float = NOW,
) -> Freshness:
    return compute_freshness(status, response_meta(headers), rule, request_time, response_time)


def reason(
    headers: list[tuple[bytes, bytes]],
    *,
    status: int = 200,
    method: bytes = b"GET",
    rule: CacheRule = RULE,
    authorized: bool = False,
    request_cc: CacheControl = NO_DIRECTIVES,
) -> str | None:
    meta = response_meta(headers)
    return uncacheable_reason(method, status, request_cc, authorized, meta, rule)


# --------------------------------------------------------------------------------------------
# Cache-Control parsing


def test_parses_response_directives() -> None:
    cc = parse_cache_control(
        b"public, max-age=60, s-maxage=30, must-revalidate, proxy-revalidate, "
        b"stale-while-revalidate=5, stale-if-error=600"
    )
    assert cc == CacheControl(
        public=True,
        max_age=60,
        s_maxage=30,
        must_revalidate=True,
        proxy_revalidate=True,
        stale_while_revalidate=5,
        stale_if_error=600,
    )


def test_parses_request_directives() -> None:
    cc = parse_cache_control(b"no-cache, max-stale, min-fresh=3, only-if-cached, no-store")
    assert cc.no_cache and cc.only_if_cached and cc.no_store
    assert cc.max_stale == DELTA_SECONDS_MAX
    assert cc.min_fresh == 3
    assert parse_cache_control(b"max-stale=7").max_stale == 7


def test_names_are_case_insensitive_and_quoted_values_accepted() -> None:
    cc = parse_cache_control(b'MAX-AGE="30", No-Store')
    assert cc.max_age == 30
    assert cc.no_store


def test_first_duplicate_wins() -> None:
    assert parse_cache_control(b"max-age=10, max-age=99").max_age == 10


def test_leading_zeros_and_overflow() -> None:
    assert parse_cache_control(b"max-age=0003600").max_age == 3600
    assert parse_cache_control(b"max-age=99999999999999999999").max_age == DELTA_SECONDS_MAX


@pytest.mark.parametrize(
    "value",
    [
        b"max-age=abc",
        b"max-age=-1",
        b"max-age=1.5",
        b"max-age =5",
        b"max-age= 5",
        b"max-age=",
    ],
)
def test_malformed_max_age_means_stale(value: bytes) -> None:
    assert parse_cache_control(value).max_age == 0


def test_malformed_stale_window_is_ignored() -> None:
    cc = parse_cache_control(b"stale-while-revalidate=soon, stale-if-error=-5")
    assert cc.stale_while_revalidate is None
    assert cc.stale_if_error is None


def test_qualified_no_cache_and_private_count_as_unqualified() -> None:
    cc = parse_cache_control(b'no-cache="set-cookie, x-foo", private="x-bar"')
    assert cc.no_cache and cc.private


def test_garbage_between_commas_is_skipped() -> None:
    cc = parse_cache_control(b',,, ;;;, "quoted", max-age=5, @@@=1, public')
    assert cc.max_age == 5 and cc.public


def test_unterminated_quote_is_malformed() -> None:
    assert split_directives('max-age="5') == [("max-age", "5", False)]
    assert parse_cache_control(b'max-age="5').max_age == 0


def test_quoted_value_may_contain_commas() -> None:
    assert split_directives('no-cache="a, b", public') == [
        ("no-cache", "a, b", True),
        ("public", None, True),
    ]


@given(st.binary(max_size=200))
def test_parser_never_raises_on_any_bytes(value: bytes) -> None:
    cc = parse_cache_control(value)
    for seconds in (cc.max_age, cc.s_maxage, cc.stale_while_revalidate, cc.stale_if_error):
        assert seconds is None or 0 <= seconds <= DELTA_SECONDS_MAX


_TOKEN = st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=12)


@given(
    st.lists(
        st.tuples(_TOKEN, st.one_of(st.none(), st.integers(0, 10**12), _TOKEN)),
        max_size=8,
    ),
    st.sampled_from([", ", ",", " , ", ",\t"]),
)
def test_well_formed_directives_round_trip(
    directives: list[tuple[str, int | str | None]], separator: str
) -> None:
    text = separator.join(
        name if value is None else f"{name}={value}" for name, value in directives
    )
    parsed = split_directives(text)
    expected = [(n, None if v is None else str(v), True) for n, v in directives]
    assert parsed == expected


@given(st.integers(0, 10**15), st.booleans())
def test_max_age_value_round_trips(seconds: int, quoted: bool) -> None:
    value = f'"{seconds}"' if quoted else str(seconds)
    assert parse_cache_control(f"max-age={value}".encode()).max_age == min(
        seconds, DELTA_SECONDS_MAX
    )


# --------------------------------------------------------------------------------------------
# HTTP dates


def test_http_date_formats() -> None:
    expected = 784111777.0
    assert parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == expected
    assert parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == expected
    assert parse_http_date(b"Sun Nov  6 08:49:37 1994") == expected
    assert parse_http_date(b"0") is None
    assert parse_http_date(b"") is None
    assert parse_http_date(format_http_date(NOW)) == NOW


# --------------------------------------------------------------------------------------------
# Storability (RFC 9111 3)


def test_plain_200_is_storable() -> None:
    assert reason([(b"date", date())]) is None


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"HEAD", b"DELETE"])
def test_only_get_responses_are_stored(method: bytes) -> None:
    assert reason([(b"cache-control", b"max-age=60")], method=method) == "method"


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
def test_cacheable_by_default_statuses(status: int) -> None:
    assert reason([], status=status) is None


@pytest.mark.parametrize("status", [201, 302, 307, 400, 403, 500, 502, 503])
def test_other_statuses_need_explicit_freshness(status: int) -> None:
    assert reason([], status=status) == "status"
    assert reason([(b"cache-control", b"max-age=5")], status=status) is None
    assert reason([(b"expires", date(10)), (b"date", date())], status=status) is None
    assert reason([(b"cache-control", b"public")], status=status) is None


@pytest.mark.parametrize("status", [206, 304, 100])
def test_partial_and_not_modified_are_never_stored(status: int) -> None:
    assert reason([(b"cache-control", b"max-age=60")], status=status) == "status"


@pytest.mark.parametrize("status", [599, 201, 418, 500])
def test_must_understand_stores_only_understood_statuses(status: int) -> None:
    assert reason([(b"cache-control", b"max-age=3600")], status=status) is None
    cc = b"max-age=3600, must-understand"
    assert reason([(b"cache-control", cc)], status=status) == "must-understand"
    assert reason([(b"cache-control", cc + b", no-store")], status=status) == "must-understand"


@pytest.mark.parametrize("status", [200, 301, 404, 307])
def test_must_understand_overrides_no_store_for_understood_statuses(status: int) -> None:
    # RFC 9111 5.2.2.3: no-store is there for caches that do not know must-understand.
    cc = b"max-age=60, must-understand, no-store"
    assert reason([(b"cache-control", cc)], status=status) is None
    assert reason([(b"cache-control", b"max-age=60, must-understand, private")]) == "private"


def test_no_store_private_and_vary_star() -> None:
    assert reason([(b"cache-control", b"no-store, max-age=60")]) == "no-store"
    assert reason([(b"cache-control", b"private, max-age=60")]) == "private"
    assert reason([(b"vary", b"accept, *")]) == "vary-star"
    request_no_store = parse_cache_control(b"no-store")
    assert reason([], request_cc=request_no_store) == "request-no-store"


def test_authorization_needs_an_explicit_share() -> None:
    assert reason([(b"cache-control", b"max-age=60")], authorized=True) == "authorization"
    for allows in (b"public", b"s-maxage=60", b"must-revalidate, max-age=60"):
        assert reason([(b"cache-control", allows)], authorized=True) is None


def test_set_cookie_only_with_the_rule() -> None:
    headers = [(b"set-cookie", b"a=b"), (b"cache-control", b"max-age=60")]
    assert reason(headers) == "set-cookie"
    assert reason(headers, rule=CacheRule(path_prefix="/", store_set_cookie=True)) is None


def test_storable_from_raw_headers() -> None:
    public = [(b"cache-control", b"public, max-age=5")]
    auth = [(b"authorization", b"Bearer x")]
    assert storable(b"GET", 200, auth, public, RULE)
    assert not storable(b"GET", 200, auth, [(b"cache-control", b"max-age=5")], RULE)
    assert not storable(b"GET", 200, [(b"cache-control", b"no-store")], public, RULE)


def test_rule_bypass() -> None:
    assert reason([], rule=CacheRule(path_prefix="/", bypass=True)) == "rule-bypass"


def test_stored_headers_drop_hop_by_hop_and_recomputed_fields() -> None:
    headers = [
        (b"connection", b"x-private-hop"),
        (b"x-private-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"10"),
        (b"age", b"3"),
        (b"x-cache", b"HIT"),
        (b"surrogate-key", b"a b"),
        (b"set-cookie", b"s=1"),
        (b"content-type", b"application/json"),
    ]
    assert stored_headers(headers, keep_set_cookie=False) == [
        (b"content-type", b"application/json")
    ]
    assert (b"set-cookie", b"s=1") in stored_headers(headers, keep_set_cookie=True)


def test_surrogate_keys_are_space_separated_and_deduplicated() -> None:
    meta = response_meta([(b"surrogate-key", b"  btc  ticker btc"), (b"surrogate-key", b"eth")])
    assert meta.surrogate_keys == ("btc", "ticker", "eth")


# --------------------------------------------------------------------------------------------
# Freshness lifetime (RFC 9111 4.2.1, 4.2.2)


def test_s_maxage_beats_max_age_beats_expires() -> None:
    base = [(b"date", date()), (b"expires", date(1000))]
    assert fresh(base).lifetime == 1000
    assert fresh([*base, (b"cache-control", b"max-age=100")]).lifetime == 100
    assert fresh([*base, (b"cache-control", b"max-age=100, s-maxage=10")]).lifetime == 10


def test_expires_minus_date() -> None:
    # The origin's clock runs 500 s behind ours: Expires - Date is what counts.
    headers = [(b"date", date(-500)), (b"expires", date(-440))]
    assert fresh(headers).lifetime == 60


def test_invalid_expires_is_in_the_past() -> None:
    f = fresh([(b"date", date()), (b"expires", b"0")])
    assert f.lifetime == 0
    assert decide(f, NO_DIRECTIVES, NOW)[0] is Use.VALIDATE


def test_heuristic_is_ten_percent_of_last_modified_age_capped() -> None:
    assert fresh([(b"date", date()), (b"last-modified", date(-1000))]).lifetime == 100
    assert fresh([(b"date", date()), (b"last-modified", date(-(10**8)))]).lifetime == HEURISTIC_CAP


def test_no_heuristic_for_statuses_not_cacheable_by_default() -> None:
    headers = [(b"date", date()), (b"last-modified", date(-1000))]
    assert fresh(headers, status=302).lifetime == 0
    assert fresh([*headers, (b"cache-control", b"public")], status=302).lifetime == 100


def test_rule_ttl_replaces_the_heuristic_but_not_origin_freshness() -> None:
    headers = [(b"date", date()), (b"last-modified", date(-(10**6)))]
    assert fresh(headers, rule=TICKER).lifetime == 1.0
    assert fresh([*headers, (b"cache-control", b"max-age=30")], rule=TICKER).lifetime == 30


def test_force_ttl_overrides_origin_freshness_and_revalidation_directives() -> None:
    forced = CacheRule(path_prefix="/", ttl=2.0, force_ttl=True, stale_if_error=9.0)
    f = fresh([(b"cache-control", b"max-age=600, must-revalidate, no-cache")], rule=forced)
    assert f.lifetime == 2.0
    assert not f.no_stale and not f.always_revalidate
    assert f.stale_if_error == 9.0


def test_no_freshness_and_no_validator_is_not_worth_storing() -> None:
    meta = response_meta([(b"date", date())])
    f = compute_freshness(200, meta, RULE, NOW, NOW)
    assert f.lifetime == 0
    assert not worth_storing(f, meta)
    meta_etag = response_meta([(b"date", date()), (b"etag", b'"v1"')])
    assert worth_storing(compute_freshness(200, meta_etag, RULE, NOW, NOW), meta_etag)


# --------------------------------------------------------------------------------------------
# Age (RFC 9111 4.2.3)


def test_age_is_corrected_by_the_response_delay() -> None:
    # Sent at NOW, answered 2 s later with Age: 10 from an upstream cache.
    f = fresh([(b"date", date()), (b"age", b"10")], request_time=NOW, response_time=NOW + 2)
    assert f.initial_age == 12  # corrected_age_value = 10 + 2 beats apparent_age = 2
    assert f.age(NOW + 2) == 12
    assert f.age(NOW + 7) == 17  # plus resident time


def test_apparent_age_wins_when_date_is_old() -> None:
    f = fresh([(b"date", date(-30)), (b"age", b"5")])
    assert f.initial_age == 29  # from the end of the Date's second (DATE_RESOLUTION)


def test_a_truncated_date_does_not_age_a_fresh_response() -> None:
    # Generated at NOW + 0.9 but dated NOW (one-second resolution), received at once:
    # a 500 ms TTL must still be fresh on arrival.
    sub_second = CacheRule(path_prefix="/", ttl=0.5, force_ttl=True)
    f = fresh([(b"date", date())], rule=sub_second, request_time=NOW + 0.9, response_time=NOW + 0.9)
    assert f.initial_age == 0
    assert f.ttl(NOW + 0.9) == 0.5


def test_date_in_the_future_gives_no_negative_age() -> None:
    f = fresh([(b"date", date(+300))])
    assert f.initial_age == 0
    assert f.age(NOW) == 0


@pytest.mark.parametrize(
    "ages",
    [[b"-4"], [b"soon"], [b"7200.0"], [b"7200,0"], [b"60;x=1"], [b"7200", b"0"], [b"-1, 0"]],
)
def test_an_untrustworthy_age_header_makes_the_response_stale(ages: list[bytes]) -> None:
    headers = [(b"date", date()), (b"cache-control", b"max-age=3600")]
    f = fresh(headers + [(b"age", value) for value in ages])
    assert f.initial_age >= 3600
    assert decide(f, NO_DIRECTIVES, NOW)[0] is not Use.FRESH


@pytest.mark.parametrize("ages", [[b"0, 7200"], [b"0,7200"], [b"0", b"7200"], [b" 0 , 0"]])
def test_an_age_list_counts_its_first_member(ages: list[bytes]) -> None:
    # RFC 9111 5.1: a list where one value is expected is read as its first member.
    headers = [(b"date", date()), (b"cache-control", b"max-age=3600")]
    f = fresh(headers + [(b"age", value) for value in ages])
    assert f.initial_age == pytest.approx(0, abs=1)
    assert decide(f, NO_DIRECTIVES, NOW)[0] is Use.FRESH


def test_a_valid_age_header_is_counted() -> None:
    f = fresh([(b"date", date()), (b"cache-control", b"max-age=3600"), (b"age", b"60")])
    assert f.initial_age == pytest.approx(60, abs=1)


def test_freshness_ends_when_age_reaches_lifetime() -> None:
    f = fresh([(b"date", date()), (b"cache-control", b"max-age=10")])
    assert decide(f, NO_DIRECTIVES, NOW + 9.9)[0] is Use.FRESH
    assert decide(f, NO_DIRECTIVES, NOW + 10.0)[0] is Use.VALIDATE


# --------------------------------------------------------------------------------------------
# Revalidation directives and stale windows (RFC 9111 4.2.4, 5.2; RFC 5861)


def test_no_cache_response_always_validates() -> None:
    f = fresh([(b"cache-control", b"no-cache, max-age=60")])
    assert decide(f, NO_DIRECTIVES, NOW)[0] is Use.VALIDATE
    assert not usable_on_error(f, NOW)


@pytest.mark.parametrize("directive", [b"must-revalidate", b"proxy-revalidate"])
def test_must_revalidate_forbids_stale(directive: bytes) -> None:
    f = fresh(
        [(b"cache-control", b"max-age=1, stale-while-revalidate=60, " + directive)], rule=TICKER
    )
    assert decide(f, NO_DIRECTIVES, NOW + 0.5)[0] is Use.FRESH
    assert decide(f, NO_DIRECTIVES, NOW + 2)[0] is Use.VALIDATE
    assert not usable_on_error(f, NOW + 2)


def test_rule_windows_apply_when_origin_sends_none() -> None:
    f = fresh([(b"date", date())], rule=TICKER)
    assert (f.lifetime, f.stale_while_revalidate, f.stale_if_error) == (1.0, 2.0, 60.0)
    assert decide(f, NO_DIRECTIVES, NOW + 2.5) == (Use.STALE, STALE_WHILE_REVALIDATE)
    assert decide(f, NO_DIRECTIVES, NOW + 3.5)[0] is Use.VALIDATE
    assert usable_on_error(f, NOW + 60.5)
    assert not usable_on_error(f, NOW + 61.5)


def test_origin_windows_win_over_the_rule() -> None:
    f = fresh(
        [(b"cache-control", b"max-age=1, stale-while-revalidate=10, stale-if-error=5")],
        rule=TICKER,
    )
    assert (f.stale_while_revalidate, f.stale_if_error) == (10, 5)


def test_s_maxage_cancels_rule_windows_but_keeps_origin_ones() -> None:
    f = fresh([(b"cache-control", b"s-maxage=1")], rule=TICKER)
    assert (f.stale_while_revalidate, f.stale_if_error) == (0, 0)
    f = fresh([(b"cache-control", b"s-maxage=1, stale-if-error=30")], rule=TICKER)
    assert (f.stale_while_revalidate, f.stale_if_error) == (0, 30)


def test_request_no_cache_and_max_age_zero_force_validation() -> None:
    f = fresh([(b"cache-control", b"max-age=60")])
    assert decide(f, parse_cache_control(b"no-cache"), NOW + 1)[0] is Use.VALIDATE
    assert decide(f, parse_cache_control(b"max-age=0"), NOW + 1)[0] is Use.VALIDATE
    assert decide(f, parse_cache_control(b"max-age=5"), NOW + 1)[0] is Use.FRESH
    # stale-if-error still covers a forced revalidation when the origin fails
    assert usable_on_error(fresh([(b"cache-control", b"max-age=60")], rule=TICKER), NOW + 1)


def test_request_min_fresh() -> None:
    f = fresh([(b"cache-control", b"max-age=60")])
    assert decide(f, parse_cache_control(b"min-fresh=30"), NOW + 20)[0] is Use.FRESH
    assert decide(f, parse_cache_control(b"min-fresh=30"), NOW + 40)[0] is Use.VALIDATE


def test_request_max_stale() -> None:
    f = fresh([(b"cache-control", b"max-age=10")])
    assert decide(f, parse_cache_control(b"max-stale=5"), NOW + 14) == (Use.STALE, STALE_MAX_STALE)
    assert decide(f, parse_cache_control(b"max-stale=5"), NOW + 16)[0] is Use.VALIDATE
    assert decide(f, parse_cache_control(b"max-stale"), NOW + 10**6)[0] is Use.STALE
    strict = fresh([(b"cache-control", b"max-age=10, must-revalidate")])
    assert decide(strict, parse_cache_control(b"max-stale"), NOW + 11)[0] is Use.VALIDATE


# --------------------------------------------------------------------------------------------
# Conditional requests (RFC 9110 13, RFC 9111 4.3)


def test_if_none_match_uses_weak_comparison() -> None:
    assert not_modified(200, b'"v1"', None, None, b'W/"v1"', None)
    assert not_modified(200, b'W/"v1"', None, None, b'"v0", "v1"', None)
    assert not not_modified(200, b'"v1"', None, None, b'"v2"', None)
    assert not_modified(200, b'"v1"', None, None, b"*", None)
    assert not not_modified(200, None, None, None, b'"v1"', None)


def test_if_none_match_decides_alone() -> None:
    lm = NOW - 100
    # ETag differs: If-Modified-Since is not consulted even though it would match.
    assert not not_modified(200, b'"v2"', lm, NOW, b'"v1"', date())


def test_if_modified_since() -> None:
    lm = NOW - 100
    assert not_modified(200, None, lm, NOW, None, date(-100))
    assert not_modified(200, None, lm, NOW, None, date())
    assert not not_modified(200, None, lm, NOW, None, date(-101))
    assert not not_modified(200, None, lm, NOW, None, b"yesterday")
    # No Last-Modified: the stored Date stands in (RFC 9111 4.3.2).
    assert not_modified(200, None, None, NOW - 50, None, date(-10))


def test_only_2xx_are_answered_304() -> None:
    assert not not_modified(404, b'"v1"', None, None, b'"v1"', None)


def test_parse_etags() -> None:
    assert parse_etags(b'"a", W/"b" ,"c"') == (b'"a"', b'"b"', b'"c"')
    assert parse_etags(b" * ") == (b"*",)
    assert parse_etags(b"a, b") is None
    assert parse_etags(b"") is None


def test_upstream_validators_and_request_headers() -> None:
    validators = upstream_validators(b'"v1"', b"Sun, 06 Nov 1994 08:49:37 GMT")
    assert validators == [
        (b"if-none-match", b'"v1"'),
        (b"if-modified-since", b"Sun, 06 Nov 1994 08:49:37 GMT"),
    ]
    client = [
        (b"accept", b"*/*"),
        (b"if-none-match", b'"client"'),
        (b"if-range", b'"x"'),
        (b"range", b"bytes=0-9"),
    ]
    assert upstream_request_headers(client, validators[:1]) == [
        (b"accept", b"*/*"),
        (b"if-none-match", b'"v1"'),
    ]


def test_merge_304_replaces_fields_but_not_body_metadata() -> None:
    stored = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"max-age=1"),
        (b"x-trace", b"a"),
        (b"x-trace", b"b"),
        (b"etag", b'"v1"'),
        (b"content-encoding", b"gzip"),
    ]
    update = [
        (b"cache-control", b"max-age=60"),
        (b"x-trace", b"c"),
        (b"content-length", b"0"),
        (b"content-encoding", b"br"),
        (b"connection", b"close"),
        (b"set-cookie", b"s=1"),
    ]
    merged = merge_not_modified(stored, update)
    assert (b"cache-control", b"max-age=60") in merged
    assert [v for n, v in merged if n == b"x-trace"] == [b"c"]
    assert (b"content-encoding", b"gzip") in merged
    assert all(n not in (b"content-length", b"connection", b"set-cookie") for n, _ in merged)
    assert (b"etag", b'"v1"') in merged


def test_merge_304_keeps_the_stored_digest_and_content_range() -> None:
    stored = [(b"content-md5", b"rL0Y20zC+Fzt72VPzMSk2A=="), (b"content-type", b"text/plain")]
    update = [
        (b"content-md5", b"N7UdGUp1E+RbVvZSTy1R8g=="),
        (b"content-range", b"bytes 0-1/2"),
        (b"content-type", b"text/plain;charset=utf-8"),
    ]
    merged = merge_not_modified(stored, update)
    assert merged == [
        (b"content-md5", b"rL0Y20zC+Fzt72VPzMSk2A=="),
        (b"content-type", b"text/plain;charset=utf-8"),
    ]


def test_merge_304_set_cookie_only_where_the_rule_stores_it() -> None:
    stored = [(b"set-cookie", b"a=b"), (b"x", b"1")]
    update = [(b"set-cookie", b"a=c"), (b"set-cookie", b"d=e")]
    assert merge_not_modified(stored, update) == stored
    assert merge_not_modified(stored, update, keep_set_cookie=True) == [
        (b"x", b"1"),
        (b"set-cookie", b"a=c"),
        (b"set-cookie", b"d=e"),
    ]


def test_304_for_another_etag_does_not_apply() -> None:
    assert not_modified_applies(b'"v1"', [(b"etag", b'W/"v1"')])
    assert not not_modified_applies(b'"v1"', [(b"etag", b'"v2"')])
    assert not_modified_applies(b'"v1"', [])


# --------------------------------------------------------------------------------------------
# Invalidation (RFC 9111 4.4)


def test_unsafe_success_invalidates_target_and_same_origin_locations() -> None:
    headers = [
        (b"location", b"/orders/7"),
        (b"content-location", b"https://evil.example/orders"),
    ]
    targets = invalidation_targets(b"POST", 201, "https://api.example/orders", headers)
    assert targets == ["https://api.example/orders", "https://api.example/orders/7"]


def test_same_origin_needs_the_same_port_and_scheme() -> None:
    headers = [
        (b"location", b"http://api.example/a"),
        (b"content-location", b"https://api.example:443/b"),
    ]
    targets = invalidation_targets(b"PUT", 200, "https://api.example/x", headers)
    assert targets == ["https://api.example/x", "https://api.example:443/b"]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE"])
def test_safe_methods_invalidate_nothing(method: bytes) -> None:
    assert invalidation_targets(method, 200, "https://a.example/x", []) == []


@pytest.mark.parametrize("status", [400, 404, 500, 503])
def test_errors_invalidate_nothing(status: int) -> None:
    assert invalidation_targets(b"DELETE", status, "https://a.example/x", []) == []


def test_unknown_methods_count_as_unsafe() -> None:
    assert invalidation_targets(b"PURGEISH", 204, "https://a.example/x", []) == [
        "https://a.example/x"
    ]


# --------------------------------------------------------------------------------------------
# The replay window of a memoised hit


@given(
    st.floats(0, 1e6),  # response_time
    st.floats(0, 100),  # initial_age
    st.floats(0, 100),  # lifetime
    st.sampled_from([0.0, 0.5, 2.0, 30.0]),  # stale_while_revalidate
    st.booleans(),  # no_stale
    st.floats(0, 200),  # now, seconds after the response arrived
    st.lists(st.floats(0, 1), min_size=1, max_size=8),  # points inside the window
)
# Found by hypothesis: the expiry computed as an instant rounded the other way from decide()'s
# ttl, so the window opened as stale-while-revalidate while decide() still said fresh.
@example(1.0, 0.0, 0.041423738866136935, 0.5, False, 0.041423738866136935, [1.0])
def test_stable_until_keeps_the_use_and_the_age_unchanged(
    arrived: float,
    initial: float,
    lifetime: float,
    swr: float,
    no_stale: bool,
    elapsed: float,
    fractions: list[float],
) -> None:
    freshness = Freshness(arrived, initial, lifetime, swr, 0.0, no_stale, False)
    now = arrived + elapsed
    until = stable_until(freshness, now)
    assert until >= now
    use = decide(freshness, NO_DIRECTIVES, now)
    if until == now:
        return
    assert until - now <= 1.0 + 1e-6  # Age ticks at least once a second
    assert use in ((Use.FRESH, ""), (Use.STALE, STALE_WHILE_REVALIDATE))
    age_now = int(freshness.age(now))
    for fraction in fractions:
        moment = now + (until - now) * fraction * 0.999999
        assert decide(freshness, NO_DIRECTIVES, moment) == use
        assert int(freshness.age(moment)) == age_now


def test_stable_until_ends_at_the_age_tick_or_the_expiry() -> None:
    fresh = Freshness(100.0, 0.0, 10.0, 0.0, 0.0, False, False)
    assert stable_until(fresh, 103.25) == pytest.approx(104.0)  # Age 3 -> 4
    assert stable_until(fresh, 109.5) == pytest.approx(110.0)  # expires, Age would be 10
    short = Freshness(100.0, 0.2, 0.5, 0.0, 0.0, False, False)
    assert stable_until(short, 100.1) == pytest.approx(100.3)  # expiry first
    assert stable_until(fresh, 99.0) == 99.0  # before it arrived: a clock stepped back
    assert stable_until(fresh, 111.0) == 111.0  # stale, no stale-while-revalidate
    swr = Freshness(100.0, 0.0, 10.0, 2.0, 0.0, False, False)
    assert stable_until(swr, 110.5) == pytest.approx(111.0)  # stale, Age 10 -> 11
    assert stable_until(swr, 111.5) == pytest.approx(112.0)  # the window's end
    assert stable_until(swr, 112.5) == 112.5  # beyond it: must revalidate
    always = Freshness(100.0, 0.0, 10.0, 0.0, 0.0, False, True)
    assert stable_until(always, 101.0) == 101.0


# --------------------------------------------------------------------------------------------
# Targeted cache control (RFC 9213; Surrogate-Control)

TARGETED = targeted_fields(["meridian", "cdn", "surrogate"])


def test_target_list_names_its_fields_in_order() -> None:
    assert TARGETED == (b"meridian-cache-control", b"cdn-cache-control", b"surrogate-control")


def test_the_first_present_targeted_field_wins_over_cache_control_and_expires() -> None:
    headers = [
        (b"date", date()),
        (b"cache-control", b"no-store"),
        (b"expires", date(-10)),
        (b"cdn-cache-control", b"max-age=600"),
        (b"meridian-cache-control", b"max-age=60, stale-while-revalidate=5"),
    ]
    meta = response_meta(headers, TARGETED)
    assert meta.cc == CacheControl(max_age=60, stale_while_revalidate=5)
    assert meta.expires is None
    assert uncacheable_reason(b"GET", 200, NO_DIRECTIVES, False, meta, RULE) is None
    assert compute_freshness(200, meta, RULE, NOW, NOW).lifetime == 60
    # Without the target list the same response is not stored.
    assert reason(headers) == "no-store"


def test_a_targeted_no_store_keeps_a_browser_cacheable_response_out_of_the_edge() -> None:
    headers = [(b"cache-control", b"public, max-age=3600"), (b"cdn-cache-control", b"no-store")]
    meta = response_meta(headers, TARGETED)
    assert uncacheable_reason(b"GET", 200, NO_DIRECTIVES, False, meta, RULE) == "no-store"


@pytest.mark.parametrize("value", [b"", b" , ", b"max-age =60", b'max-age="6', b"max-age=60, ?"])
def test_an_invalid_or_empty_targeted_field_falls_back(value: bytes) -> None:
    headers = [(b"cache-control", b"max-age=30"), (b"cdn-cache-control", value)]
    assert response_meta(headers, TARGETED).cc.max_age == 30


def test_a_later_valid_target_is_used_when_the_first_is_invalid() -> None:
    headers = [(b"meridian-cache-control", b"max-age =1"), (b"surrogate-control", b"max-age=9")]
    assert response_meta(headers, TARGETED).cc.max_age == 9


def test_surrogate_control_directives_for_another_surrogate_are_skipped() -> None:
    headers = [(b"cache-control", b"max-age=30"), (b"surrogate-control", b"max-age=60;box1")]
    assert response_meta(headers, TARGETED).cc.max_age == 30
    headers = [(b"surrogate-control", b"no-store;box1, max-age=60")]
    assert response_meta(headers, TARGETED).cc == CacheControl(max_age=60)
    # RFC 9213 fields ignore parameters instead.
    assert response_meta([(b"cdn-cache-control", b"max-age=60;x")], TARGETED).cc.max_age == 60


@given(st.binary(max_size=80))
def test_targeted_parsing_never_raises(value: bytes) -> None:
    cc = targeted_cache_control([(b"cdn-cache-control", value)], TARGETED)
    assert cc is None or isinstance(cc, CacheControl)


def test_without_fields_drops_only_the_named_ones() -> None:
    headers = [(b"cdn-cache-control", b"max-age=1"), (b"cache-control", b"max-age=2")]
    assert without_fields(headers, frozenset(TARGETED)) == [(b"cache-control", b"max-age=2")]
