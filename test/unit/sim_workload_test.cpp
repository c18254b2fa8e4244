// The engine simulator's workload logic (tools/sim/workload.hpp): the KV
// pattern catches every kind of misplaced byte, the generator shares
// prefixes deterministically, the allocator never hands a block out twice.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <stdexcept>

#include "sim/workload.hpp"

using namespace kvlink;
using namespace kvlink::sim;

namespace {

// 3 layers, 16 blocks of 4 tokens, 2 heads x 3 x 2 bytes: 12 bytes per token
// (not a multiple of 8: the partial last word is covered too).
struct Cache {
  wire::KvLayout layout = wire::paged_layout(3, 16, 4, 2, 3, 2);
  std::vector<std::byte> memory = std::vector<std::byte>(layout.region_bytes);
  KvView kv{memory.data(), layout};
};

std::vector<Token> tokens(std::size_t n, Token first = 100) {
  std::vector<Token> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = first + static_cast<Token>(i * 7);
  return t;
}

std::uint64_t bad(const Cache& c, const std::vector<Token>& t, const std::vector<std::uint32_t>& blocks,
                  std::uint32_t first, std::uint32_t last) {
  std::uint64_t n = 0;
  verify_tokens(c.kv, t, blocks, first, last, 4, &n);
  return n;
}

}  // namespace

TEST_CASE("sim pattern: filled tokens verify; every kind of misplaced byte is caught") {
  Cache c;
  const auto t = tokens(10);  // 3 blocks, the last one partial
  const std::vector<std::uint32_t> blocks{7, 2, 11};
  fill_tokens(c.kv, t, blocks, 0, 10);
  CHECK(bad(c, t, blocks, 0, 10) == 0);

  SUBCASE("one flipped byte") {
    c.kv.token(2, 1, 11, 1)[11] ^= std::byte{1};  // last byte of token 9's V at layer 2
    std::uint64_t n = 0;
    auto m = verify_tokens(c.kv, t, blocks, 0, 10, 4, &n);
    CHECK(n == 1);
    REQUIRE(m.size() == 1);
    CHECK(m[0].position == 9);
    CHECK(m[0].block == 11);
    CHECK(m[0].layer == 2);
    CHECK(m[0].plane == 1);
  }
  SUBCASE("the right bytes in the wrong block") {
    const std::vector<std::uint32_t> swapped{2, 7, 11};
    CHECK(bad(c, t, swapped, 0, 8) == 8 * 3 * 2);
  }
  SUBCASE("another layer's or plane's data") {
    std::memcpy(c.kv.token(0, 0, 7, 0), c.kv.token(1, 0, 7, 0), c.kv.token_bytes());
    std::memcpy(c.kv.token(0, 1, 2, 0), c.kv.token(0, 0, 2, 0), c.kv.token_bytes());
    CHECK(bad(c, t, blocks, 0, 10) == 2);
  }
  SUBCASE("a shifted slot inside the block") {
    std::memcpy(c.kv.token(1, 0, 2, 1), c.kv.token(1, 0, 2, 0), c.kv.token_bytes());
    CHECK(bad(c, t, blocks, 0, 10) == 1);
  }
  SUBCASE("the same token id at another position, or another id at this position") {
    auto other = t;
    other[3] += 1;
    CHECK(bad(c, other, blocks, 0, 10) == 3 * 2);
    std::vector<std::byte> a(c.kv.token_bytes()), b(c.kv.token_bytes());
    fill_token(a, 5, 0, 0, 0);
    fill_token(b, 5, 1, 0, 0);
    CHECK(a != b);
  }
  SUBCASE("poisoned blocks fail until filled again") {
    const std::vector<std::uint32_t> hit{7, 2};
    poison_blocks(c.kv, hit);
    CHECK(bad(c, t, blocks, 0, 8) == 8 * 3 * 2);
    CHECK(bad(c, t, blocks, 8, 10) == 0);  // block 11 untouched
    fill_tokens(c.kv, t, blocks, 0, 8);
    CHECK(bad(c, t, blocks, 0, 10) == 0);
  }
}

TEST_CASE("sim requests: deterministic, shared prefixes are equal, tails differ, lengths in range") {
  WorkloadConfig cfg;
  cfg.seed = 42;
  cfg.prefixes = 3;
  cfg.prefix_tokens = 64;
  cfg.min_prompt_tokens = 40;
  cfg.max_prompt_tokens = 200;
  cfg.share_ratio = 0.7;
  RequestGenerator a(cfg), b(cfg);
  std::vector<Request> rs;
  for (int i = 0; i < 300; ++i) {
    auto r = a.next();
    auto r2 = b.next();
    CHECK(r.tokens == r2.tokens);  // same seed, same workload
    CHECK(r.id == "req-" + std::to_string(i));
    CHECK(r.tokens.size() >= 40);
    CHECK(r.tokens.size() <= 200);
    for (auto tok : r.tokens) CHECK(tok < cfg.vocab);
    rs.push_back(std::move(r));
  }
  const auto shared = std::count_if(rs.begin(), rs.end(), [](const Request& r) { return r.prefix >= 0; });
  CHECK(shared > 300 * 0.55);
  CHECK(shared < 300 * 0.85);
  std::set<int> seen;
  for (std::size_t i = 0; i < rs.size(); ++i)
    for (std::size_t j = i + 1; j < rs.size(); ++j) {
      const auto& x = rs[i];
      const auto& y = rs[j];
      const std::size_t n = std::min({x.tokens.size(), y.tokens.size(), std::size_t{64}});
      const bool same_head = std::equal(x.tokens.begin(), x.tokens.begin() + static_cast<std::ptrdiff_t>(n),
                                        y.tokens.begin());
      if (x.prefix >= 0 && x.prefix == y.prefix) {
        CHECK(same_head);
        seen.insert(x.prefix);
      } else {
        CHECK(!same_head);
      }
      // Past the prefix, every request's tokens are its own.
      if (x.tokens.size() > 72 && y.tokens.size() > 72)
        CHECK(!std::equal(x.tokens.begin() + 64, x.tokens.begin() + 72, y.tokens.begin() + 64));
    }
  CHECK(seen.size() == 3);
  cfg.seed = 43;
  CHECK(RequestGenerator(cfg).next().tokens != rs[0].tokens);
}

TEST_CASE("sim requests: bad configs are refused naming the flag") {
  WorkloadConfig c;
  c.max_prompt_tokens = 10;
  c.min_prompt_tokens = 20;
  CHECK(check(c).message().find("--max-prompt-tokens") != std::string::npos);
  CHECK_THROWS_AS(RequestGenerator{c}, std::invalid_argument);
  c = {};
  c.prefixes = 0;
  CHECK(check(c).message().find("--prefixes") != std::string::npos);
  c.share_ratio = 0;
  CHECK_FALSE(check(c));
  c.share_ratio = 1.5;
  CHECK(check(c).message().find("--share-ratio") != std::string::npos);
}

TEST_CASE("sim blocks: scrambled, never handed out twice, refused when short, double release caught") {
  BlockAllocator alloc(64, 7);
  auto a = alloc.allocate(10);
  REQUIRE(a);
  bool contiguous = true;
  for (std::size_t i = 1; i < a->size(); ++i) contiguous = contiguous && (*a)[i] == (*a)[i - 1] + 1;
  CHECK(!contiguous);
  auto b = alloc.allocate(54);
  REQUIRE(b);
  std::set<std::uint32_t> all(a->begin(), a->end());
  all.insert(b->begin(), b->end());
  CHECK(all.size() == 64);
  CHECK(*all.rbegin() == 63);
  CHECK(!alloc.allocate(1));
  alloc.release(*a);
  CHECK(alloc.free_blocks() == 10);
  CHECK(!alloc.allocate(11));
  auto c = alloc.allocate(10);
  REQUIRE(c);
  CHECK(std::set<std::uint32_t>(c->begin(), c->end()) == std::set<std::uint32_t>(a->begin(), a->end()));
  alloc.release(*c);
  CHECK_THROWS_AS(alloc.release(*c), std::logic_error);
  const std::vector<std::uint32_t> outside{64};
  CHECK_THROWS_AS(alloc.release(outside), std::logic_error);
  CHECK(blocks_for(0, 16) == 0);
  CHECK(blocks_for(17, 16) == 2);
}
