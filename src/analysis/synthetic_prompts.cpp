#include "analysis/synthetic_prompts.h"

#include <fmt/format.h>

#include <array>
#include <random>

namespace moescope::analysis {

std::vector<std::string> synthetic_math_prompts(int n, uint64_t seed) {
  struct Person {
    const char* name;
    const char* he;  // subject pronoun, capitalised
  };
  static constexpr std::array<Person, 10> people = {{{"Janet", "She"}, {"Tom", "He"}, {"Maria", "She"}, {"Ahmed", "He"},
                                                     {"Lena", "She"}, {"Kenji", "He"}, {"Priya", "She"}, {"Carlos", "He"},
                                                     {"Amara", "She"}, {"Oliver", "He"}}};
  static constexpr std::array<const char*, 8> items = {"apples", "marbles", "stickers", "books", "cookies", "pencils", "eggs", "cards"};
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::vector<std::string> prompts;
  for (int i = 0; i < n; ++i) {
    const int pi = pick(0, static_cast<int>(people.size()) - 1);
    const int qi = (pi + pick(1, static_cast<int>(people.size()) - 1)) % static_cast<int>(people.size());  // someone else
    const Person& p = people[static_cast<size_t>(pi)];
    const Person& q = people[static_cast<size_t>(qi)];
    const char* item = items[static_cast<size_t>(pick(0, static_cast<int>(items.size()) - 1))];
    switch (i % 8) {
      case 0:
        prompts.push_back(fmt::format("{} has {} {}. {} buys {} more and gives {} to {}. How many {} does {} have now?", p.name,
                                      pick(5, 40), item, p.he, pick(2, 20), pick(1, 5), q.name, item, p.name));
        break;
      case 1: {
        const int price = pick(2, 9), count = pick(2, 8);
        prompts.push_back(fmt::format("A store sells {} for ${} each. {} buys {} of them and pays with a ${} bill. How much change does {} get?",
                                      item, price, p.name, count, (price * count / 10 + 1) * 10, p.name));
        break;
      }
      case 2:
        prompts.push_back(fmt::format("{} reads {} pages a day for {} days, then {} pages a day for {} more days. How many pages does {} read in all?",
                                      p.name, pick(5, 30), pick(2, 7), pick(10, 40), pick(2, 5), p.name));
        break;
      case 3:
        prompts.push_back(fmt::format("A farm has {} chickens and {} cows. How many legs do the animals on the farm have in total?",
                                      pick(3, 30), pick(2, 15)));
        break;
      case 4:
        prompts.push_back(fmt::format("{} earns ${} per hour and works {} hours each week. How much money does {} earn in {} weeks?", p.name,
                                      pick(8, 30), pick(10, 40), p.name, pick(2, 6)));
        break;
      case 5: {
        const int batch = pick(2, 6) * 6;
        prompts.push_back(fmt::format("A recipe uses {} cups of flour to make {} cookies. How many cups of flour does {} need to make {} cookies?",
                                      pick(2, 5), batch, p.name, batch * pick(2, 5)));
        break;
      }
      case 6:
        prompts.push_back(fmt::format("{} and {} share {} {} so that {} gets twice as many as {}. How many {} does {} get?", p.name, q.name,
                                      pick(4, 30) * 3, item, p.name, q.name, item, p.name));
        break;
      default:
        prompts.push_back(fmt::format("A train travels at {} miles per hour for {} hours and then at {} miles per hour for {} hours. How far does it travel?",
                                      pick(30, 80), pick(2, 5), pick(40, 90), pick(1, 4)));
        break;
    }
  }
  return prompts;
}

}  // namespace moescope::analysis
