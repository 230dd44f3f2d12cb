//! The AWS IoT rules-engine SQL subset, evaluated locally: a rule statement
//! (`SELECT … FROM '<topic filter>' [WHERE …]`) is parsed once with [`Statement::parse`] and then
//! evaluated against each incoming message with [`Statement::evaluate`], which gives the rule's
//! output JSON object, or `None` when the rule does not fire. Substitution templates such as
//! `alerts/${topic(3)}` (used in action parameters) are parsed with [`Template::parse`] and
//! rendered with [`Template::render`].
//!
//! Everything here is pure: no I/O and no clock. The caller passes the topic, the client ID, the
//! time (`timestamp_ms`) and the parsed payload in a [`Context`].
//!
//! # Grammar
//! Keywords (`SELECT FROM WHERE AS AND OR NOT TRUE FALSE NULL`) and function names are
//! case-insensitive; whitespace, including newlines, may stand between any two tokens.
//!
//! ```text
//! statement   := SELECT select_list FROM string [WHERE expr]          (then end of input)
//! select_list := item ("," item)*
//! item        := "*" [AS name] | expr [AS name]
//! expr        := or
//! or          := and (OR and)*
//! and         := not (AND not)*
//! not         := NOT not | comparison
//! comparison  := additive (("=" | "<>" | "!=" | "<" | "<=" | ">" | ">=") additive)*
//! additive    := multiplicative (("+" | "-") multiplicative)*
//! multiplicative := unary (("*" | "/" | "%") unary)*
//! unary       := "-" unary | primary
//! primary     := integer | decimal | string | TRUE | FALSE | NULL
//!              | "(" expr ")" | function "(" [expr ("," expr)*] ")" | path
//! path        := name ("." name | "[" integer "]")*
//! function    := topic | timestamp | clientid
//! ```
//!
//! - `integer` is a run of ASCII digits that fits in `i64`; `decimal` is digits with a fraction
//!   (`1.5`) and/or an exponent (`15e-1`, `1.5E+3`).
//! - `string` is single-quoted; `''` inside it stands for one `'`. There are no other escapes.
//! - `name` is a letter or `_` followed by letters, digits or `_`. The first name of a path must
//!   not be a reserved keyword; names after `.` may be anything, keywords included.
//! - Functions: `topic()` (the whole topic), `topic(n)` (the n-th level, 1-based),
//!   `timestamp()` (the context's epoch milliseconds) and `clientid()`.
//! - Precedence, tightest first: unary `-`; `* / %`; `+ -`; comparisons; `NOT`; `AND`; `OR`.
//!   Binary operators, comparisons included, associate to the left.
//! - Templates: literal text with `${expr}` parts, where `expr` is the `expr` above.
//!
//! # What must stay true
//! - No input can make this module panic: not the SQL text, not the template text, not the
//!   payload. Parsing and evaluation recurse only along the expression tree, whose parenthesis /
//!   `NOT` / unary-minus / function-argument nesting is bounded by 64 levels and whose total height
//!   is bounded by 256 levels; deeper input is a [`ParseError`], never a stack overflow. Payload
//!   JSON is walked iteratively (only cloning a selected value into the output uses
//!   `serde_json`'s own code).
//! - Undefined (a missing attribute, a type mismatch, a division by zero) is a value distinct
//!   from JSON `null`; it never makes a rule fire and never appears in an output object.
//! - `WHERE` is evaluated before `SELECT`, against the payload only: `SELECT` aliases are not
//!   visible in it, nor in templates.
//! - Every [`ParseError`] has a 1-based line and column counted in characters (a `\n` starts a
//!   new line) and a message that says what was found and what was expected.
//!
//! # Decisions where AWS is unclear (or where this subset differs)
//! Operator semantics follow the AWS IoT SQL reference (2016-03-23) operator tables; the points
//! below settle what those tables leave open.
//! 1. **Trailing `;`** is rejected with its own message: a rule is one statement.
//! 2. **`SELECT VALUE`** is not supported (the output is always an object); it is rejected with a
//!    clear message. `get()` and every other AWS function are not supported either: an unknown
//!    function is a parse error that lists the supported ones. Keys that are not plain names
//!    (hyphens, leading digits) cannot be addressed, except through `*`.
//! 3. **`*`** may appear anywhere in the select list, more than once. A bare `*` copies the
//!    members of the payload when the payload is a JSON object, and nothing otherwise (a JSON
//!    array or scalar payload, or a payload that is not JSON). `* AS name` puts the whole payload,
//!    whatever JSON it is, under `name` (omitted when the payload is not JSON).
//! 4. **Output keys.** Items are applied left to right, so a later key replaces an earlier one
//!    (including members copied by `*`); an item whose value is Undefined removes its key. Without
//!    `AS`, a path's key is its last name (`a.b[0]` → `b`), a function's key is its lower-case
//!    name (`topic(3)` → `topic`), and any other expression's key is `_N`, N being the item's
//!    1-based position in the select list (`*` items count). Key order in the output object is
//!    `serde_json::Map`'s order.
//! 5. **Numbers.** AWS has 34-digit Ints and Decimals; here an Int is an `i64` and a Decimal an
//!    `f64`. An integer operation that overflows `i64` is done in `f64` instead. A result that is
//!    not finite is Undefined. Int and Decimal compare exactly, without rounding the Int. A
//!    Decimal stays a Decimal (`10.0` is output as `10.0`, as SQL version 2015-10-08 does;
//!    2016-03-23 would print `10`). An integer literal beyond `i64` is a parse error.
//! 6. **Numeric strings** are strings matching `-?digits[.digits][(e|E)[-]digits]` (the AWS
//!    String→Decimal rule); nothing else, not even surrounding spaces, converts.
//! 7. **Ordering comparisons** (`< <= > >=`) convert both sides to numbers: `'141' > 140` is true.
//!    Following AWS, two strings that are not both numeric give Undefined (there is no
//!    lexicographic order), and so does any other type (booleans, null, arrays, objects).
//! 8. **`=` and `<>`** follow AWS: Int vs Decimal compares numerically; strings, booleans,
//!    arrays (same items, same order) and objects (same keys and values, any order) compare by
//!    value; `null = null` is true; mismatched types give `=` false and `<>` true, so `'5' = 5` is
//!    false (no numeric conversion for equality). `!=` is accepted as a synonym of `<>`.
//! 9. **`+`** follows AWS: if either side is a string, the other is turned into text (numbers in
//!    JSON form, `true`/`false`, `null`, arrays and objects as compact JSON) and the two are
//!    concatenated, so `'141' + 1` is `'1411'`; two numbers add; anything else is Undefined.
//! 10. **`- * / %`** convert numeric strings; when a string took part the result is a Decimal
//!     (the AWS table), otherwise Int op Int is an Int and any Decimal makes a Decimal.
//!     **Int / Int is an Int truncated toward zero** (the AWS table says Int: `7 / 2` is `3`,
//!     `7.0 / 2` is `3.5`). `%` takes the sign of the dividend. Division or modulo by zero is
//!     Undefined.
//! 11. **Unary `-`** negates a number or a numeric string (giving a Decimal); anything else is
//!     Undefined.
//! 12. **`AND`, `OR`, `NOT`** accept booleans and the strings `"true"`/`"false"` (any case).
//!     `false AND x` and `x AND false` are false for any `x`, Undefined included; `true OR x` and
//!     `x OR true` are true; otherwise a non-boolean operand gives Undefined.
//! 13. **`WHERE`** fires only on the Boolean `true`; the string `"true"` does not fire.
//! 14. **Any operator with an Undefined operand is Undefined**, except as in point 12.
//! 15. **`topic(n)`** takes an expression; an Int is used as it is, a Decimal is rounded, a numeric
//!     string is truncated; any other value, or an n outside 1..=levels, gives Undefined. An empty
//!     level (`a//b`) is the empty string. The topic is numbered as given in the context: a Basic
//!     Ingest `$aws/rules/<rule>/` prefix must be stripped by the caller. `clientid()` returns the
//!     context's client ID verbatim (AWS uses `"n/a"` for messages that did not come over MQTT;
//!     the caller passes that).
//! 16. **`null`** is a literal (`SELECT NULL AS n` outputs `{"n":null}`); null is a value, so it is
//!     output, unlike Undefined.
//! 17. **Array index** `a[0]` is 0-based and takes a non-negative integer literal only; out of
//!     range or applied to a non-array it is Undefined.
//! 18. **Topic filters** are checked when parsing: not empty, no NUL, `+` and `#` only as a whole
//!     level, `#` only as the last level. Matching follows MQTT: `+` matches exactly one level
//!     (an empty one included), `#` matches the rest including the parent (`a/#` matches `a`), and
//!     a filter starting with `+` or `#` never matches a topic starting with `$`. A topic that is
//!     empty or contains `+` or `#` is not a valid publish topic and never matches.
//! 19. **Templates** see the original payload and the functions, like `WHERE` (the rule's output
//!     and its aliases are not visible). `$` not followed by `{` is literal text; `$$` is not
//!     interpreted here (the republish action turns `$$` into `$`). A `${` part ends at the first
//!     `}` outside a single-quoted string. Rendering: Undefined is the empty string, strings
//!     without quotes, numbers in JSON form, booleans as `true`/`false`, null as `null`, arrays
//!     and objects as compact JSON.
//! 20. **Positions** are counted in Unicode scalar values (`char`s); a `\r` counts as a column.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

/// How deeply parentheses, `NOT`, unary `-` and function arguments may nest.
const MAX_NESTING: usize = 64;
/// How tall an expression tree may be (long operator chains count one level per operator).
const MAX_HEIGHT: usize = 256;
/// Keywords that cannot start an attribute path or be used as an alias.
const RESERVED: [&str; 10] = [
    "SELECT", "FROM", "WHERE", "AS", "AND", "OR", "NOT", "TRUE", "FALSE", "NULL",
];
/// Longest token text quoted in an error message before it is cut.
const MAX_QUOTED_CHARS: usize = 40;
/// The functions this subset knows, as listed in error messages.
const SUPPORTED_FUNCTIONS: &str = "topic(), topic(n), timestamp() and clientid()";

/// A parse error with its place in the SQL text (1-based line and column, in characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// 1-based line of the offending text.
    pub line: usize,
    /// 1-based column (in characters) of the offending text.
    pub column: usize,
    /// What was found and what was expected, e.g. `expected FROM, found 'WHERE'`.
    pub message: String,
}

/// A parsed rule statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    items: Vec<SelectItem>,
    filter: String,
    condition: Option<Expr>,
}

/// What a rule sees of one message.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The topic the message was published on.
    pub topic: &'a str,
    /// The publisher's client ID (what `clientid()` returns).
    pub client_id: &'a str,
    /// Epoch milliseconds (timestamp() returns it).
    pub timestamp_ms: i64,
    /// The message payload parsed as JSON (None: not JSON — then every attribute is Undefined and
    /// only SELECT of functions/literals can produce output).
    pub payload: Option<&'a Value>,
}

/// A substitution template such as `alerts/${topic(3)}` or `${clientid()}-${heartbeat + 1}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

// ---------------------------------------------------------------------------------------------
// Syntax tree
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum SelectItem {
    /// `*` or `* AS alias`.
    All { alias: Option<String> },
    /// `expr [AS alias]`, with the output key already decided.
    Item { key: String, expr: Expr },
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Expr(Expr),
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Null,
    Bool(bool),
    Int(i64),
    Dec(f64),
    Str(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnaryOp {
    Not,
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinaryOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, PartialEq)]
enum Function {
    Topic(Option<Box<Expr>>),
    Timestamp,
    ClientId,
}

impl Function {
    fn name(&self) -> &'static str {
        match self {
            Function::Topic(_) => "topic",
            Function::Timestamp => "timestamp",
            Function::ClientId => "clientid",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Literal(Literal),
    Path(Vec<Segment>),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    Call(Function),
}

// ---------------------------------------------------------------------------------------------
// Positions and errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    column: usize,
}

impl Pos {
    const START: Pos = Pos { line: 1, column: 1 };

    fn after(self, c: char) -> Pos {
        if c == '\n' {
            Pos {
                line: self.line.saturating_add(1),
                column: 1,
            }
        } else {
            Pos {
                line: self.line,
                column: self.column.saturating_add(1),
            }
        }
    }
}

fn error_at(pos: Pos, message: impl Into<String>) -> ParseError {
    ParseError {
        line: pos.line,
        column: pos.column,
        message: message.into(),
    }
}

/// Quotes text for an error message, cutting it when long.
fn quote(text: &str) -> String {
    let mut out = String::from("'");
    let mut chars = text.chars();
    out.extend(chars.by_ref().take(MAX_QUOTED_CHARS));
    if chars.next().is_some() {
        out.push('…');
    }
    out.push('\'');
    out
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Name(String),
    Int(i64),
    Dec(f64),
    /// A string literal with the position of each decoded character.
    Str {
        value: String,
        char_pos: Vec<Pos>,
    },
    Comma,
    Dot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Star,
    Plus,
    Minus,
    Slash,
    Percent,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Semicolon,
    End,
}

#[derive(Debug, Clone, PartialEq)]
struct Token {
    kind: Kind,
    pos: Pos,
    /// The source text of the token (strings with their quotes).
    text: String,
}

struct Cursor<'s> {
    chars: &'s [char],
    index: usize,
    pos: Pos,
}

impl<'s> Cursor<'s> {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.index
            .checked_add(ahead)
            .and_then(|i| self.chars.get(i))
            .copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.get(self.index).copied()?;
        self.index += 1;
        self.pos = self.pos.after(c);
        Some(c)
    }

    fn bump_while(&mut self, pred: impl Fn(char) -> bool) {
        while self.peek(0).is_some_and(&pred) {
            self.bump();
        }
    }

    fn text_since(&self, begin: usize) -> String {
        self.chars
            .get(begin..self.index)
            .unwrap_or_default()
            .iter()
            .collect()
    }
}

fn is_name_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_name_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits `chars` (starting at `start` in the source) into tokens; returns them and the position
/// just after the last character.
fn lex(chars: &[char], start: Pos) -> Result<(Vec<Token>, Pos), ParseError> {
    let mut cur = Cursor {
        chars,
        index: 0,
        pos: start,
    };
    let mut tokens = Vec::new();
    while let Some(c) = cur.peek(0) {
        if c.is_whitespace() {
            cur.bump();
            continue;
        }
        let pos = cur.pos;
        let begin = cur.index;
        let kind = if c == '\'' {
            lex_string(&mut cur)?
        } else if c.is_ascii_digit() {
            lex_number(&mut cur, pos, begin)?
        } else if is_name_start(c) {
            cur.bump_while(is_name_continue);
            Kind::Name(cur.text_since(begin))
        } else {
            lex_symbol(&mut cur, c, pos)?
        };
        tokens.push(Token {
            kind,
            pos,
            text: cur.text_since(begin),
        });
    }
    Ok((tokens, cur.pos))
}

fn lex_string(cur: &mut Cursor<'_>) -> Result<Kind, ParseError> {
    let open = cur.pos;
    cur.bump();
    let mut value = String::new();
    let mut char_pos = Vec::new();
    loop {
        let here = cur.pos;
        match cur.bump() {
            None => {
                return Err(error_at(
                    open,
                    "unterminated string literal: expected a closing quote (')",
                ))
            }
            Some('\'') => {
                if cur.peek(0) == Some('\'') {
                    cur.bump();
                    value.push('\'');
                    char_pos.push(here);
                } else {
                    return Ok(Kind::Str { value, char_pos });
                }
            }
            Some(c) => {
                value.push(c);
                char_pos.push(here);
            }
        }
    }
}

fn lex_number(cur: &mut Cursor<'_>, pos: Pos, begin: usize) -> Result<Kind, ParseError> {
    let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
    cur.bump_while(|c| c.is_ascii_digit());
    let mut decimal = false;
    if cur.peek(0) == Some('.') && digit(cur.peek(1)) {
        cur.bump();
        cur.bump_while(|c| c.is_ascii_digit());
        decimal = true;
    }
    if matches!(cur.peek(0), Some('e' | 'E'))
        && (digit(cur.peek(1)) || (matches!(cur.peek(1), Some('+' | '-')) && digit(cur.peek(2))))
    {
        cur.bump();
        if matches!(cur.peek(0), Some('+' | '-')) {
            cur.bump();
        }
        cur.bump_while(|c| c.is_ascii_digit());
        decimal = true;
    }
    if cur.peek(0).is_some_and(is_name_continue) {
        cur.bump_while(is_name_continue);
        return Err(error_at(
            pos,
            format!(
                "invalid number {}: expected digits, a fraction or an exponent",
                quote(&cur.text_since(begin))
            ),
        ));
    }
    let text = cur.text_since(begin);
    if decimal {
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Kind::Dec(f)),
            _ => Err(error_at(
                pos,
                format!("decimal literal {} is out of range", quote(&text)),
            )),
        }
    } else {
        text.parse::<i64>().map(Kind::Int).map_err(|_| {
            error_at(
                pos,
                format!(
                    "integer literal {} is out of range: expected at most {}",
                    quote(&text),
                    i64::MAX
                ),
            )
        })
    }
}

fn lex_symbol(cur: &mut Cursor<'_>, c: char, pos: Pos) -> Result<Kind, ParseError> {
    cur.bump();
    let kind = match c {
        ',' => Kind::Comma,
        '.' => Kind::Dot,
        '(' => Kind::LParen,
        ')' => Kind::RParen,
        '[' => Kind::LBracket,
        ']' => Kind::RBracket,
        '*' => Kind::Star,
        '+' => Kind::Plus,
        '-' => Kind::Minus,
        '/' => Kind::Slash,
        '%' => Kind::Percent,
        '=' => Kind::Eq,
        ';' => Kind::Semicolon,
        '<' => match cur.peek(0) {
            Some('=') => {
                cur.bump();
                Kind::Le
            }
            Some('>') => {
                cur.bump();
                Kind::Ne
            }
            _ => Kind::Lt,
        },
        '>' => {
            if cur.peek(0) == Some('=') {
                cur.bump();
                Kind::Ge
            } else {
                Kind::Gt
            }
        }
        '!' if cur.peek(0) == Some('=') => {
            cur.bump();
            Kind::Ne
        }
        '!' => {
            return Err(error_at(
                pos,
                "unexpected character '!': expected '!=' (or use NOT)",
            ))
        }
        '"' => {
            return Err(error_at(
                pos,
                "unexpected character '\"': string literals use single quotes (')",
            ))
        }
        other => {
            return Err(error_at(
                pos,
                format!("unexpected character {}", quote(&other.to_string())),
            ))
        }
    };
    Ok(kind)
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

/// An expression with the height of its tree.
struct Node {
    expr: Expr,
    height: usize,
}

impl Node {
    fn leaf(expr: Expr) -> Node {
        Node { expr, height: 1 }
    }
}

struct Parser {
    tokens: Vec<Token>,
    index: usize,
    end: Token,
    /// How the end of the input is named in messages.
    end_name: &'static str,
    depth: usize,
}

fn is_keyword(token: &Token, keyword: &str) -> bool {
    matches!(&token.kind, Kind::Name(n) if n.eq_ignore_ascii_case(keyword))
}

fn is_reserved(name: &str) -> bool {
    RESERVED.iter().any(|k| name.eq_ignore_ascii_case(k))
}

impl Parser {
    fn new(tokens: Vec<Token>, end_pos: Pos, end_name: &'static str) -> Parser {
        Parser {
            tokens,
            index: 0,
            end: Token {
                kind: Kind::End,
                pos: end_pos,
                text: String::new(),
            },
            end_name,
            depth: 0,
        }
    }

    fn peek(&self) -> &Token {
        self.peek_at(0)
    }

    fn peek_at(&self, ahead: usize) -> &Token {
        self.index
            .checked_add(ahead)
            .and_then(|i| self.tokens.get(i))
            .unwrap_or(&self.end)
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if self.index < self.tokens.len() {
            self.index += 1;
        }
        token
    }

    fn describe(&self, token: &Token) -> String {
        match token.kind {
            Kind::End => self.end_name.to_string(),
            Kind::Str { .. } => format!("string {}", quote_string_token(&token.text)),
            _ => quote(&token.text),
        }
    }

    fn expected(&self, what: &str) -> ParseError {
        let found = self.peek();
        error_at(
            found.pos,
            format!("expected {what}, found {}", self.describe(found)),
        )
    }

    fn at_keyword(&self, keyword: &str) -> bool {
        is_keyword(self.peek(), keyword)
    }

    fn enter(&mut self, pos: Pos) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            Err(error_at(
                pos,
                format!("expression is nested too deeply: more than {MAX_NESTING} levels of parentheses, NOT, unary '-' or function arguments"),
            ))
        } else {
            Ok(())
        }
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    fn statement(&mut self) -> Result<Statement, ParseError> {
        if !self.at_keyword("SELECT") {
            return Err(self.expected("SELECT"));
        }
        self.advance();
        if is_keyword(self.peek(), "VALUE") && starts_expression(self.peek_at(1)) {
            return Err(error_at(
                self.peek().pos,
                "SELECT VALUE is not supported: expected a select list (the output is always a JSON object)",
            ));
        }
        if self.at_keyword("FROM") || matches!(self.peek().kind, Kind::End | Kind::Comma) {
            return Err(self.expected("a select list (* or expressions)"));
        }
        let mut items = Vec::new();
        loop {
            let position = items.len() + 1;
            items.push(self.select_item(position)?);
            if self.peek().kind == Kind::Comma {
                self.advance();
            } else {
                break;
            }
        }
        if !self.at_keyword("FROM") {
            return Err(self.expected("FROM"));
        }
        self.advance();
        let token = self.peek().clone();
        let filter = match token.kind {
            Kind::Str { value, char_pos } => {
                validate_filter(&value, &char_pos, token.pos)?;
                self.advance();
                value
            }
            _ => return Err(self.expected("a topic filter in single quotes")),
        };
        let condition = if self.at_keyword("WHERE") {
            self.advance();
            Some(self.expression()?.expr)
        } else {
            None
        };
        match self.peek().kind {
            Kind::End => Ok(Statement {
                items,
                filter,
                condition,
            }),
            Kind::Semicolon => Err(error_at(
                self.peek().pos,
                "unexpected ';': expected end of statement (a rule is one statement, without a trailing semicolon)",
            )),
            _ if condition.is_none() => Err(self.expected("WHERE or end of statement")),
            _ => Err(self.expected("end of statement")),
        }
    }

    fn select_item(&mut self, position: usize) -> Result<SelectItem, ParseError> {
        if self.peek().kind == Kind::Star {
            self.advance();
            let alias = self.alias()?;
            return Ok(SelectItem::All { alias });
        }
        let expr = self.expression()?.expr;
        let key = match self.alias()? {
            Some(alias) => alias,
            None => default_key(&expr, position),
        };
        Ok(SelectItem::Item { key, expr })
    }

    fn alias(&mut self) -> Result<Option<String>, ParseError> {
        if !self.at_keyword("AS") {
            return Ok(None);
        }
        self.advance();
        match &self.peek().kind {
            Kind::Name(name) if !is_reserved(name) => {
                let name = name.clone();
                self.advance();
                Ok(Some(name))
            }
            _ => Err(self.expected("an alias name after AS")),
        }
    }

    fn expression(&mut self) -> Result<Node, ParseError> {
        self.or()
    }

    fn or(&mut self) -> Result<Node, ParseError> {
        let mut left = self.and()?;
        while self.at_keyword("OR") {
            let pos = self.advance().pos;
            let right = self.and()?;
            left = binary(BinaryOp::Or, left, right, pos)?;
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Node, ParseError> {
        let mut left = self.not()?;
        while self.at_keyword("AND") {
            let pos = self.advance().pos;
            let right = self.not()?;
            left = binary(BinaryOp::And, left, right, pos)?;
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Node, ParseError> {
        if !self.at_keyword("NOT") {
            return self.comparison();
        }
        let pos = self.advance().pos;
        self.enter(pos)?;
        let operand = self.not()?;
        self.leave();
        unary(UnaryOp::Not, operand, pos)
    }

    fn comparison(&mut self) -> Result<Node, ParseError> {
        let mut left = self.additive()?;
        loop {
            let op = match self.peek().kind {
                Kind::Eq => BinaryOp::Eq,
                Kind::Ne => BinaryOp::Ne,
                Kind::Lt => BinaryOp::Lt,
                Kind::Le => BinaryOp::Le,
                Kind::Gt => BinaryOp::Gt,
                Kind::Ge => BinaryOp::Ge,
                _ => return Ok(left),
            };
            let pos = self.advance().pos;
            let right = self.additive()?;
            left = binary(op, left, right, pos)?;
        }
    }

    fn additive(&mut self) -> Result<Node, ParseError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek().kind {
                Kind::Plus => BinaryOp::Add,
                Kind::Minus => BinaryOp::Sub,
                _ => return Ok(left),
            };
            let pos = self.advance().pos;
            let right = self.multiplicative()?;
            left = binary(op, left, right, pos)?;
        }
    }

    fn multiplicative(&mut self) -> Result<Node, ParseError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek().kind {
                Kind::Star => BinaryOp::Mul,
                Kind::Slash => BinaryOp::Div,
                Kind::Percent => BinaryOp::Rem,
                _ => return Ok(left),
            };
            let pos = self.advance().pos;
            let right = self.unary()?;
            left = binary(op, left, right, pos)?;
        }
    }

    fn unary(&mut self) -> Result<Node, ParseError> {
        if self.peek().kind != Kind::Minus {
            return self.primary();
        }
        let pos = self.advance().pos;
        self.enter(pos)?;
        let operand = self.unary()?;
        self.leave();
        unary(UnaryOp::Neg, operand, pos)
    }

    fn primary(&mut self) -> Result<Node, ParseError> {
        let token = self.peek().clone();
        match token.kind {
            Kind::Int(i) => {
                self.advance();
                Ok(Node::leaf(Expr::Literal(Literal::Int(i))))
            }
            Kind::Dec(f) => {
                self.advance();
                Ok(Node::leaf(Expr::Literal(Literal::Dec(f))))
            }
            Kind::Str { value, .. } => {
                self.advance();
                Ok(Node::leaf(Expr::Literal(Literal::Str(value))))
            }
            Kind::LParen => {
                self.advance();
                self.enter(token.pos)?;
                let inner = self.expression()?;
                if self.peek().kind != Kind::RParen {
                    return Err(self.expected("')'"));
                }
                self.advance();
                self.leave();
                Ok(inner)
            }
            Kind::Name(name) => {
                let literal = if name.eq_ignore_ascii_case("TRUE") {
                    Some(Literal::Bool(true))
                } else if name.eq_ignore_ascii_case("FALSE") {
                    Some(Literal::Bool(false))
                } else if name.eq_ignore_ascii_case("NULL") {
                    Some(Literal::Null)
                } else {
                    None
                };
                if let Some(literal) = literal {
                    self.advance();
                    Ok(Node::leaf(Expr::Literal(literal)))
                } else if is_reserved(&name) {
                    Err(self.expected("an expression"))
                } else if self.peek_at(1).kind == Kind::LParen {
                    self.call(&name, token.pos)
                } else {
                    self.path(name)
                }
            }
            _ => Err(self.expected("an expression")),
        }
    }

    fn call(&mut self, name: &str, pos: Pos) -> Result<Node, ParseError> {
        let lower = name.to_ascii_lowercase();
        if !matches!(lower.as_str(), "topic" | "timestamp" | "clientid") {
            return Err(error_at(
                pos,
                format!(
                    "unknown function {}: expected one of the supported functions {SUPPORTED_FUNCTIONS}",
                    quote(name)
                ),
            ));
        }
        self.advance();
        self.advance();
        let mut args = Vec::new();
        if self.peek().kind != Kind::RParen {
            loop {
                let arg_pos = self.peek().pos;
                self.enter(arg_pos)?;
                args.push(self.expression()?);
                self.leave();
                if self.peek().kind == Kind::Comma {
                    self.advance();
                } else {
                    break;
                }
            }
            if self.peek().kind != Kind::RParen {
                return Err(self.expected("',' or ')'"));
            }
        }
        self.advance();
        let count = args.len();
        let mut args = args.into_iter();
        match (lower.as_str(), args.next(), count) {
            ("topic", None, 0) => Ok(Node::leaf(Expr::Call(Function::Topic(None)))),
            ("topic", Some(arg), 1) => {
                let height = arg.height + 1;
                check_height(height, pos)?;
                Ok(Node {
                    expr: Expr::Call(Function::Topic(Some(Box::new(arg.expr)))),
                    height,
                })
            }
            ("timestamp", None, 0) => Ok(Node::leaf(Expr::Call(Function::Timestamp))),
            ("clientid", None, 0) => Ok(Node::leaf(Expr::Call(Function::ClientId))),
            ("topic", _, _) => Err(error_at(
                pos,
                format!(
                    "function topic takes 0 or 1 arguments (topic() or topic(n)), found {count}"
                ),
            )),
            (other, _, _) => Err(error_at(
                pos,
                format!("function {other} takes no arguments ({other}()), found {count}"),
            )),
        }
    }

    fn path(&mut self, first: String) -> Result<Node, ParseError> {
        self.advance();
        let mut segments = vec![Segment::Key(first)];
        loop {
            match self.peek().kind {
                Kind::Dot => {
                    self.advance();
                    match &self.peek().kind {
                        Kind::Name(name) => {
                            segments.push(Segment::Key(name.clone()));
                            self.advance();
                        }
                        _ => return Err(self.expected("an attribute name after '.'")),
                    }
                }
                Kind::LBracket => {
                    self.advance();
                    let index = match self.peek().kind {
                        Kind::Int(i) => usize::try_from(i).ok(),
                        _ => None,
                    };
                    let Some(index) = index else {
                        return Err(self.expected("an array index (a non-negative integer)"));
                    };
                    self.advance();
                    if self.peek().kind != Kind::RBracket {
                        return Err(self.expected("']'"));
                    }
                    self.advance();
                    segments.push(Segment::Index(index));
                }
                _ => return Ok(Node::leaf(Expr::Path(segments))),
            }
        }
    }
}

/// Quotes a string token's source text (which already has its quotes), cutting it when long.
fn quote_string_token(text: &str) -> String {
    let inner = text
        .strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .unwrap_or(text);
    quote(inner)
}

fn starts_expression(token: &Token) -> bool {
    match &token.kind {
        Kind::Name(name) => {
            !is_reserved(name)
                || ["TRUE", "FALSE", "NULL", "NOT"]
                    .iter()
                    .any(|k| name.eq_ignore_ascii_case(k))
        }
        Kind::Int(_) | Kind::Dec(_) | Kind::Str { .. } | Kind::LParen | Kind::Minus => true,
        _ => false,
    }
}

fn check_height(height: usize, pos: Pos) -> Result<(), ParseError> {
    if height > MAX_HEIGHT {
        Err(error_at(
            pos,
            format!("expression is too complex: more than {MAX_HEIGHT} levels of operators; expected a shorter expression"),
        ))
    } else {
        Ok(())
    }
}

fn binary(op: BinaryOp, left: Node, right: Node, pos: Pos) -> Result<Node, ParseError> {
    let height = left.height.max(right.height) + 1;
    check_height(height, pos)?;
    Ok(Node {
        expr: Expr::Binary(op, Box::new(left.expr), Box::new(right.expr)),
        height,
    })
}

fn unary(op: UnaryOp, operand: Node, pos: Pos) -> Result<Node, ParseError> {
    let height = operand.height + 1;
    check_height(height, pos)?;
    Ok(Node {
        expr: Expr::Unary(op, Box::new(operand.expr)),
        height,
    })
}

fn default_key(expr: &Expr, position: usize) -> String {
    match expr {
        Expr::Path(segments) => segments
            .iter()
            .rev()
            .find_map(|s| match s {
                Segment::Key(k) => Some(k.clone()),
                Segment::Index(_) => None,
            })
            .unwrap_or_else(|| format!("_{position}")),
        Expr::Call(function) => function.name().to_string(),
        _ => format!("_{position}"),
    }
}

/// Checks an MQTT topic filter; `char_pos` gives the source position of each character.
fn validate_filter(filter: &str, char_pos: &[Pos], literal_pos: Pos) -> Result<(), ParseError> {
    if filter.is_empty() {
        return Err(error_at(
            literal_pos,
            "invalid topic filter '': expected a non-empty topic filter",
        ));
    }
    let levels = filter.split('/').count();
    let mut offset = 0usize;
    for (level_index, level) in filter.split('/').enumerate() {
        for (i, c) in level.chars().enumerate() {
            let problem = match c {
                '#' if level != "#" => Some("'#' must be a whole level"),
                '#' if level_index + 1 != levels => Some("'#' is allowed only as the last level"),
                '+' if level != "+" => Some("'+' must be a whole level"),
                '\0' => Some("a topic filter must not contain a NUL character"),
                _ => None,
            };
            if let Some(problem) = problem {
                let pos = char_pos.get(offset + i).copied().unwrap_or(literal_pos);
                return Err(error_at(
                    pos,
                    format!("invalid topic filter {}: {problem}", quote(filter)),
                ));
            }
        }
        offset += level.chars().count() + 1;
    }
    Ok(())
}

/// Does the MQTT topic filter `filter` match the publish topic `topic`? (The gateway's one
/// matcher, [`crate::gatekeeper::policy::topic_matches`], with the `$` rule; a "topic" that is
/// empty or holds a wildcard is no publish topic and matches nothing.)
fn filter_matches(filter: &str, topic: &str) -> bool {
    !topic.is_empty()
        && !topic.contains(['+', '#'])
        && crate::gatekeeper::policy::topic_matches(filter, topic)
}

// ---------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------

impl Statement {
    /// Parses a rule statement, `SELECT <items> FROM '<topic filter>' [WHERE <condition>]`.
    pub fn parse(sql: &str) -> Result<Statement, ParseError> {
        let chars: Vec<char> = sql.chars().collect();
        let (tokens, end) = lex(&chars, Pos::START)?;
        Parser::new(tokens, end, "end of input").statement()
    }

    /// The FROM topic filter (MQTT filter with + and #, as written inside the quotes).
    pub fn topic_filter(&self) -> &str {
        &self.filter
    }

    /// Does the statement's FROM filter match `topic` (MQTT rules: `+` one level, `#` the rest, a
    /// filter starting with a wildcard never matches a topic starting with `$`)?
    pub fn matches_topic(&self, topic: &str) -> bool {
        filter_matches(&self.filter, topic)
    }

    /// Evaluate: `None` when WHERE is not true (false or Undefined) or the topic does not match;
    /// otherwise `Some(output JSON object)`.
    pub fn evaluate(&self, ctx: &Context<'_>) -> Option<Value> {
        if !self.matches_topic(ctx.topic) {
            return None;
        }
        if let Some(condition) = &self.condition {
            if !matches!(eval(condition, ctx), Val::Bool(true)) {
                return None;
            }
        }
        let mut out = Map::new();
        for item in &self.items {
            match item {
                SelectItem::All { alias: None } => {
                    if let Some(Value::Object(members)) = ctx.payload {
                        for (key, value) in members {
                            out.insert(key.clone(), value.clone());
                        }
                    }
                }
                SelectItem::All { alias: Some(alias) } => match ctx.payload {
                    Some(payload) => {
                        out.insert(alias.clone(), payload.clone());
                    }
                    None => {
                        out.remove(alias);
                    }
                },
                SelectItem::Item { key, expr } => match to_json(eval(expr, ctx)) {
                    Some(value) => {
                        out.insert(key.clone(), value);
                    }
                    None => {
                        out.remove(key);
                    }
                },
            }
        }
        Some(Value::Object(out))
    }
}

impl Template {
    /// Parses a substitution template: literal text with `${expr}` parts. `${` without a
    /// matching `}` is an error; `$` not followed by `{` is literal.
    pub fn parse(text: &str) -> Result<Template, ParseError> {
        let chars: Vec<char> = text.chars().collect();
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut index = 0usize;
        let mut pos = Pos::START;
        while let Some(&c) = chars.get(index) {
            if c != '$' || chars.get(index + 1) != Some(&'{') {
                literal.push(c);
                pos = pos.after(c);
                index += 1;
                continue;
            }
            let open = pos;
            pos = pos.after('$').after('{');
            index += 2;
            let expr_begin = index;
            let expr_pos = pos;
            let mut quote_open: Option<Pos> = None;
            let mut close = None;
            while let Some(&d) = chars.get(index) {
                if quote_open.is_some() {
                    if d == '\'' {
                        quote_open = None;
                    }
                } else if d == '\'' {
                    quote_open = Some(pos);
                } else if d == '}' {
                    close = Some(index);
                    break;
                }
                pos = pos.after(d);
                index += 1;
            }
            let Some(close) = close else {
                return Err(match quote_open {
                    Some(q) => error_at(
                        q,
                        "unterminated string literal: expected a closing quote (')",
                    ),
                    None => error_at(open, "unterminated '${': expected '}'"),
                });
            };
            let expr_chars = chars.get(expr_begin..close).unwrap_or_default();
            let (tokens, end) = lex(expr_chars, expr_pos)?;
            let mut parser = Parser::new(tokens, end, "'}'");
            let node = parser.expression()?;
            if parser.peek().kind != Kind::End {
                return Err(parser.expected("'}'"));
            }
            if !literal.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut literal)));
            }
            parts.push(Part::Expr(node.expr));
            pos = pos.after('}');
            index = close + 1;
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// Render: each `${expr}` is evaluated against `ctx` — the original payload and the
    /// functions, like WHERE (not the rule's output, so SELECT aliases are not visible).
    /// Undefined renders as the empty string; strings render without quotes; numbers in their
    /// JSON form; booleans as `true`/`false`; null as `null`; objects/arrays as compact JSON.
    pub fn render(&self, ctx: &Context<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Expr(expr) => {
                    let value = eval(expr, ctx);
                    if !matches!(value, Val::Undefined) {
                        out.push_str(&to_text(&value));
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// A runtime value. Arrays and objects only come from the payload and stay borrowed.
#[derive(Debug, Clone)]
enum Val<'a> {
    Undefined,
    Null,
    Bool(bool),
    Int(i64),
    Dec(f64),
    Str(Cow<'a, str>),
    Json(&'a Value),
}

#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Dec(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            // Precision loss above 2^53 is accepted for mixed Int/Decimal arithmetic.
            Num::Int(i) => i as f64,
            Num::Dec(f) => f,
        }
    }
}

fn json_number(n: &Number) -> Option<Num> {
    if let Some(i) = n.as_i64() {
        Some(Num::Int(i))
    } else {
        n.as_f64().filter(|f| f.is_finite()).map(Num::Dec)
    }
}

fn from_json(value: &Value) -> Val<'_> {
    match value {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => match json_number(n) {
            Some(Num::Int(i)) => Val::Int(i),
            Some(Num::Dec(f)) => Val::Dec(f),
            None => Val::Undefined,
        },
        Value::String(s) => Val::Str(Cow::Borrowed(s)),
        Value::Array(_) | Value::Object(_) => Val::Json(value),
    }
}

fn to_json(value: Val<'_>) -> Option<Value> {
    match value {
        Val::Undefined => None,
        Val::Null => Some(Value::Null),
        Val::Bool(b) => Some(Value::Bool(b)),
        Val::Int(i) => Some(Value::from(i)),
        Val::Dec(f) => Number::from_f64(f).map(Value::Number),
        Val::Str(s) => Some(Value::String(s.into_owned())),
        Val::Json(v) => Some(v.clone()),
    }
}

fn dec_text(f: f64) -> String {
    Number::from_f64(f).map_or_else(|| f.to_string(), |n| n.to_string())
}

/// The text form used by `+` concatenation and template rendering (Undefined gives "").
fn to_text<'a>(value: &Val<'a>) -> Cow<'a, str> {
    match value {
        Val::Undefined => Cow::Borrowed(""),
        Val::Null => Cow::Borrowed("null"),
        Val::Bool(true) => Cow::Borrowed("true"),
        Val::Bool(false) => Cow::Borrowed("false"),
        Val::Int(i) => Cow::Owned(i.to_string()),
        Val::Dec(f) => Cow::Owned(dec_text(*f)),
        Val::Str(s) => s.clone(),
        Val::Json(v) => Cow::Owned(serde_json::to_string(v).unwrap_or_default()),
    }
}

/// Parses an AWS numeric string: `-?\d+(\.\d+)?([eE]-?\d+)?`, nothing around it.
fn parse_numeric(s: &str) -> Option<Num> {
    let bytes = s.as_bytes();
    let mut i = 0usize;
    let digits = |i: &mut usize| {
        let start = *i;
        while bytes.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if bytes.first() == Some(&b'-') {
        i += 1;
    }
    if !digits(&mut i) {
        return None;
    }
    let mut integral = true;
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return None;
        }
        integral = false;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if bytes.get(i) == Some(&b'-') {
            i += 1;
        }
        if !digits(&mut i) {
            return None;
        }
        integral = false;
    }
    if i != bytes.len() {
        return None;
    }
    if integral {
        if let Ok(n) = s.parse::<i64>() {
            return Some(Num::Int(n));
        }
    }
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(Num::Dec)
}

/// A number, or a numeric string converted (the flag says a string was converted).
fn numeric(value: &Val<'_>) -> Option<(Num, bool)> {
    match value {
        Val::Int(i) => Some((Num::Int(*i), false)),
        Val::Dec(f) => Some((Num::Dec(*f), false)),
        Val::Str(s) => parse_numeric(s).map(|n| (n, true)),
        _ => None,
    }
}

fn to_bool(value: &Val<'_>) -> Option<bool> {
    match value {
        Val::Bool(b) => Some(*b),
        Val::Str(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Val::Str(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Converts a function argument to an Int: Decimals round, numeric strings truncate.
fn to_int(value: &Val<'_>) -> Option<i64> {
    let in_range =
        |f: f64| (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f);
    match value {
        Val::Int(i) => Some(*i),
        Val::Dec(f) => {
            let r = f.round();
            in_range(r).then_some(r as i64)
        }
        Val::Str(s) => match parse_numeric(s)? {
            Num::Int(i) => Some(i),
            Num::Dec(f) => {
                let t = f.trunc();
                in_range(t).then_some(t as i64)
            }
        },
        _ => None,
    }
}

/// Compares an Int with a Decimal exactly.
fn cmp_int_dec(i: i64, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // i64 spans [-2^63, 2^63); both bounds are exact in f64.
    if f >= 9_223_372_036_854_775_808.0 {
        return Some(Ordering::Less);
    }
    if f < -9_223_372_036_854_775_808.0 {
        return Some(Ordering::Greater);
    }
    let t = f.trunc();
    // `t` is integral and in range, so the conversion is exact.
    match i.cmp(&(t as i64)) {
        Ordering::Equal => t.partial_cmp(&f),
        other => Some(other),
    }
}

fn cmp_num(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(&y)),
        (Num::Dec(x), Num::Dec(y)) => x.partial_cmp(&y),
        (Num::Int(x), Num::Dec(y)) => cmp_int_dec(x, y),
        (Num::Dec(x), Num::Int(y)) => cmp_int_dec(y, x).map(Ordering::reverse),
    }
}

/// Structural JSON equality (numbers compared numerically), without recursion.
fn json_eq(a: &Value, b: &Value) -> bool {
    let mut pending = vec![(a, b)];
    while let Some(pair) = pending.pop() {
        match pair {
            (Value::Null, Value::Null) => {}
            (Value::Bool(x), Value::Bool(y)) if x == y => {}
            (Value::Number(x), Value::Number(y)) => {
                let same = match (json_number(x), json_number(y)) {
                    (Some(p), Some(q)) => cmp_num(p, q) == Some(Ordering::Equal),
                    _ => false,
                };
                if !same {
                    return false;
                }
            }
            (Value::String(x), Value::String(y)) if x == y => {}
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                pending.extend(x.iter().zip(y.iter()));
            }
            (Value::Object(x), Value::Object(y)) if x.len() == y.len() => {
                for (key, value) in x {
                    match y.get(key) {
                        Some(other) => pending.push((value, other)),
                        None => return false,
                    }
                }
            }
            _ => return false,
        }
    }
    true
}

/// `=`: `None` stands for Undefined.
fn equals(a: &Val<'_>, b: &Val<'_>) -> Option<bool> {
    Some(match (a, b) {
        (Val::Undefined, _) | (_, Val::Undefined) => return None,
        (Val::Null, Val::Null) => true,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::Json(x), Val::Json(y)) => json_eq(x, y),
        (Val::Int(_) | Val::Dec(_), Val::Int(_) | Val::Dec(_)) => match (numeric(a), numeric(b)) {
            (Some((x, _)), Some((y, _))) => cmp_num(x, y) == Some(Ordering::Equal),
            _ => false,
        },
        _ => false,
    })
}

fn finite(f: f64) -> Val<'static> {
    if f.is_finite() {
        Val::Dec(f)
    } else {
        Val::Undefined
    }
}

fn arithmetic<'a>(op: BinaryOp, a: &Val<'a>, b: &Val<'a>) -> Val<'a> {
    if op == BinaryOp::Add {
        if matches!(a, Val::Undefined) || matches!(b, Val::Undefined) {
            return Val::Undefined;
        }
        if matches!(a, Val::Str(_)) || matches!(b, Val::Str(_)) {
            let mut text = to_text(a).into_owned();
            text.push_str(&to_text(b));
            return Val::Str(Cow::Owned(text));
        }
    }
    let (Some((x, x_str)), Some((y, y_str))) = (numeric(a), numeric(b)) else {
        return Val::Undefined;
    };
    if let (Num::Int(x), Num::Int(y), false, false) = (x, y, x_str, y_str) {
        let exact = match op {
            BinaryOp::Add => x.checked_add(y),
            BinaryOp::Sub => x.checked_sub(y),
            BinaryOp::Mul => x.checked_mul(y),
            BinaryOp::Div if y == 0 => return Val::Undefined,
            BinaryOp::Div => x.checked_div(y),
            BinaryOp::Rem if y == 0 => return Val::Undefined,
            // The only overflow, i64::MIN % -1, is mathematically 0.
            BinaryOp::Rem => Some(x.checked_rem(y).unwrap_or(0)),
            _ => return Val::Undefined,
        };
        if let Some(n) = exact {
            return Val::Int(n);
        }
    }
    let (x, y) = (x.as_f64(), y.as_f64());
    match op {
        BinaryOp::Add => finite(x + y),
        BinaryOp::Sub => finite(x - y),
        BinaryOp::Mul => finite(x * y),
        BinaryOp::Div if y == 0.0 => Val::Undefined,
        BinaryOp::Div => finite(x / y),
        BinaryOp::Rem if y == 0.0 => Val::Undefined,
        BinaryOp::Rem => finite(x % y),
        _ => Val::Undefined,
    }
}

fn ordering(op: BinaryOp, a: &Val<'_>, b: &Val<'_>) -> Val<'static> {
    let (Some((x, _)), Some((y, _))) = (numeric(a), numeric(b)) else {
        return Val::Undefined;
    };
    let Some(order) = cmp_num(x, y) else {
        return Val::Undefined;
    };
    Val::Bool(match op {
        BinaryOp::Lt => order == Ordering::Less,
        BinaryOp::Le => order != Ordering::Greater,
        BinaryOp::Gt => order == Ordering::Greater,
        BinaryOp::Ge => order != Ordering::Less,
        _ => return Val::Undefined,
    })
}

fn lookup<'a>(payload: &'a Value, segments: &[Segment]) -> Val<'a> {
    let mut current = payload;
    for segment in segments {
        let next = match (segment, current) {
            (Segment::Key(key), Value::Object(members)) => members.get(key),
            (Segment::Index(i), Value::Array(items)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(value) => current = value,
            None => return Val::Undefined,
        }
    }
    from_json(current)
}

fn eval<'a>(expr: &'a Expr, ctx: &Context<'a>) -> Val<'a> {
    match expr {
        Expr::Literal(literal) => match literal {
            Literal::Null => Val::Null,
            Literal::Bool(b) => Val::Bool(*b),
            Literal::Int(i) => Val::Int(*i),
            Literal::Dec(f) => Val::Dec(*f),
            Literal::Str(s) => Val::Str(Cow::Borrowed(s)),
        },
        Expr::Path(segments) => match ctx.payload {
            Some(payload) => lookup(payload, segments),
            None => Val::Undefined,
        },
        Expr::Call(Function::Topic(None)) => Val::Str(Cow::Borrowed(ctx.topic)),
        Expr::Call(Function::Topic(Some(arg))) => {
            let level = to_int(&eval(arg, ctx))
                .and_then(|n| n.checked_sub(1))
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| ctx.topic.split('/').nth(n));
            level.map_or(Val::Undefined, |l| Val::Str(Cow::Borrowed(l)))
        }
        Expr::Call(Function::Timestamp) => Val::Int(ctx.timestamp_ms),
        Expr::Call(Function::ClientId) => Val::Str(Cow::Borrowed(ctx.client_id)),
        Expr::Unary(UnaryOp::Not, operand) => {
            to_bool(&eval(operand, ctx)).map_or(Val::Undefined, |b| Val::Bool(!b))
        }
        Expr::Unary(UnaryOp::Neg, operand) => match numeric(&eval(operand, ctx)) {
            Some((Num::Int(i), false)) => i
                .checked_neg()
                .map_or_else(|| finite(-(i as f64)), Val::Int),
            Some((n, _)) => finite(-n.as_f64()),
            None => Val::Undefined,
        },
        Expr::Binary(op @ (BinaryOp::And | BinaryOp::Or), left, right) => {
            // The value that decides the result on its own: false for AND, true for OR.
            let decisive = *op == BinaryOp::Or;
            let l = to_bool(&eval(left, ctx));
            if l == Some(decisive) {
                return Val::Bool(decisive);
            }
            let r = to_bool(&eval(right, ctx));
            if r == Some(decisive) {
                return Val::Bool(decisive);
            }
            match (l, r) {
                (Some(_), Some(_)) => Val::Bool(!decisive),
                _ => Val::Undefined,
            }
        }
        Expr::Binary(op, left, right) => {
            let a = eval(left, ctx);
            let b = eval(right, ctx);
            match op {
                BinaryOp::Eq => equals(&a, &b).map_or(Val::Undefined, Val::Bool),
                BinaryOp::Ne => equals(&a, &b).map_or(Val::Undefined, |e| Val::Bool(!e)),
                BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => ordering(*op, &a, &b),
                _ => arithmetic(*op, &a, &b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use serde_json::json;
    use std::time::{SystemTime, UNIX_EPOCH};

    const SHADOW_TOPIC: &str = "$aws/things/pm-01/shadow/update/accepted";
    const CLIENT: &str = "client-1";

    fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn ctx<'a>(topic: &'a str, payload: Option<&'a Value>, now: i64) -> Context<'a> {
        Context {
            topic,
            client_id: CLIENT,
            timestamp_ms: now,
            payload,
        }
    }

    fn parse(sql: &str) -> Statement {
        match Statement::parse(sql) {
            Ok(statement) => statement,
            Err(e) => panic!("{sql:?} should parse: {e}"),
        }
    }

    fn run(sql: &str, topic: &str, payload: Option<&Value>) -> Option<Value> {
        parse(sql).evaluate(&ctx(topic, payload, now_ms()))
    }

    /// The value of `expr` selected as `v` (None: Undefined, so omitted).
    fn value_at(expr: &str, topic: &str, payload: Option<&Value>) -> Option<Value> {
        let filter = if topic.starts_with('$') {
            "$aws/#"
        } else {
            "#"
        };
        let sql = format!("SELECT {expr} AS v FROM '{filter}'");
        match run(&sql, topic, payload) {
            Some(Value::Object(out)) => out.get("v").cloned(),
            other => panic!("{sql:?} should always give an object, gave {other:?}"),
        }
    }

    fn value(expr: &str, payload: &Value) -> Option<Value> {
        value_at(expr, "t/1", Some(payload))
    }

    fn fires(condition: &str, payload: &Value) -> bool {
        let sql = format!("SELECT * FROM '#' WHERE {condition}");
        run(&sql, "t/1", Some(payload)).is_some()
    }

    fn parse_error(sql: &str) -> ParseError {
        match Statement::parse(sql) {
            Ok(statement) => panic!("{sql:?} should not parse, gave {statement:?}"),
            Err(e) => e,
        }
    }

    fn render(template: &str, topic: &str, payload: Option<&Value>) -> String {
        match Template::parse(template) {
            Ok(t) => t.render(&ctx(topic, payload, now_ms())),
            Err(e) => panic!("{template:?} should parse: {e}"),
        }
    }

    // ---- the ward design's examples -------------------------------------------------------

    #[test]
    fn ward_example_fires_only_above_140() {
        let sql = "SELECT * FROM '$aws/things/Pacemaker-IoT/shadow/update/accepted' \
                   WHERE state.reported.heartbeat > 140";
        let topic = "$aws/things/Pacemaker-IoT/shadow/update/accepted";
        let high = json!({"state": {"reported": {"heartbeat": 141}}, "version": 3});
        let normal = json!({"state": {"reported": {"heartbeat": 140}}});
        let without = json!({"state": {"reported": {"battery": 80}}});
        assert_eq!(run(sql, topic, Some(&high)), Some(high.clone()));
        assert_eq!(run(sql, topic, Some(&normal)), None);
        assert_eq!(run(sql, topic, Some(&without)), None);
        assert_eq!(run(sql, topic, None), None);
        assert_eq!(
            run(sql, "$aws/things/Other/shadow/update/accepted", Some(&high)),
            None
        );
    }

    #[test]
    fn ward_example_with_aliases_and_topic_level() {
        let sql = "SELECT state.reported.heartbeat AS heartbeat, topic(3) AS device \
                   FROM '$aws/things/+/shadow/update/accepted' \
                   WHERE state.reported.heartbeat > 140";
        let topic = "$aws/things/Pacemaker-IoT/shadow/update/accepted";
        let high = json!({"state": {"reported": {"heartbeat": 141}}});
        assert_eq!(
            run(sql, topic, Some(&high)),
            Some(json!({"heartbeat": 141, "device": "Pacemaker-IoT"}))
        );
        let normal = json!({"state": {"reported": {"heartbeat": 90}}});
        assert_eq!(run(sql, topic, Some(&normal)), None);
    }

    // ---- parsing ----------------------------------------------------------------------------

    #[test]
    fn every_construct_parses_and_evaluates() {
        let payload = json!({
            "a": 1, "b": 2, "s": "141", "name": "Bob", "flag": true, "n": null,
            "state": {"reported": {"heartbeat": 141, "list": [10, [20, 21]]}},
            "arr": [5, 6, 7], "obj": {"k": "v"},
        });
        let cases: &[(&str, Value)] = &[
            ("SELECT a FROM '#'", json!({"a": 1})),
            ("select a from '#'", json!({"a": 1})),
            ("SeLeCt a As x FrOm '#' WhErE a = 1", json!({"x": 1})),
            ("SELECT a AS x, b AS y FROM '#'", json!({"x": 1, "y": 2})),
            ("SELECT\n\t*\r\nFROM\n'#'\nWHERE\na\n=\n1", payload.clone()),
            ("SELECT*FROM'#'WHERE(a=1)", payload.clone()),
            ("SELECT *, 15 AS speed FROM '#'", {
                let mut p = payload.clone();
                p["speed"] = json!(15);
                p
            }),
            ("SELECT * AS all FROM '#'", json!({ "all": payload.clone() })),
            ("SELECT state.reported.heartbeat FROM '#'", json!({"heartbeat": 141})),
            ("SELECT state.reported.list[1][0] AS x FROM '#'", json!({"x": 20})),
            ("SELECT arr[2] FROM '#'", json!({"arr": 7})),
            ("SELECT obj FROM '#'", json!({"obj": {"k": "v"}})),
            ("SELECT 1 AS i, 2.5 AS d, 1.5e3 AS e, 2E-1 AS f FROM '#'",
                json!({"i": 1, "d": 2.5, "e": 1500.0, "f": 0.2})),
            ("SELECT 'it''s' AS s, '' AS e FROM '#'", json!({"s": "it's", "e": ""})),
            ("SELECT TRUE AS t, false AS f, NULL AS n FROM '#'",
                json!({"t": true, "f": false, "n": null})),
            ("SELECT (a + b) * 3 AS x FROM '#'", json!({"x": 9})),
            ("SELECT -a AS x, - -a AS y FROM '#'", json!({"x": -1, "y": 1})),
            ("SELECT NOT flag AS x FROM '#'", json!({"x": false})),
            ("SELECT a <> b AS ne, a != b AS ne2, a < b AS lt, a <= 1 AS le, a > b AS gt, a >= 1 AS ge FROM '#'",
                json!({"ne": true, "ne2": true, "lt": true, "le": true, "gt": false, "ge": true})),
            ("SELECT 7 % 4 AS m, 8 / 2 AS q, 3 - 5 AS d FROM '#'", json!({"m": 3, "q": 4, "d": -2})),
            ("SELECT a = 1 AND b = 2 OR false AS x FROM '#'", json!({"x": true})),
            ("SELECT topic() AS t, topic(1) AS l, timestamp() > 0 AS ts, clientid() AS c FROM '#'",
                json!({"t": "t/1", "l": "t", "ts": true, "c": CLIENT})),
            ("SELECT Topic ( 2 ) AS l, CLIENTID() AS c FROM '#'", json!({"l": "1", "c": CLIENT})),
            ("SELECT state.from AS x, value FROM '#'", json!({})),
            ("SELECT name FROM 't/+' WHERE name = 'Bob'", json!({"name": "Bob"})),
        ];
        for (sql, expected) in cases {
            assert_eq!(
                run(sql, "t/1", Some(&payload)).as_ref(),
                Some(expected),
                "{sql}"
            );
        }
    }

    #[test]
    fn topic_filter_is_kept_as_written() {
        let cases = [
            (
                "SELECT * FROM '$aws/things/+/shadow/update/accepted'",
                "$aws/things/+/shadow/update/accepted",
            ),
            ("SELECT * FROM 'ward/#'", "ward/#"),
            ("SELECT * FROM '#'", "#"),
            ("SELECT * FROM 'it''s/+'", "it's/+"),
            ("SELECT * FROM 'a//b'", "a//b"),
        ];
        for (sql, filter) in cases {
            assert_eq!(parse(sql).topic_filter(), filter, "{sql}");
        }
    }

    #[test]
    fn parse_errors_have_exact_positions_and_messages() {
        let supported =
            "expected one of the supported functions topic(), topic(n), timestamp() and clientid()";
        let cases: Vec<(String, usize, usize, String)> = vec![
            ("SELECT * WHERE a = 1".into(), 1, 10, "expected FROM, found 'WHERE'".into()),
            ("SELECT a,\n  b\n WHERE b > 1".into(), 3, 2, "expected FROM, found 'WHERE'".into()),
            ("SELECT a b FROM 'x'".into(), 1, 10, "expected FROM, found 'b'".into()),
            ("SELECT * FROM 'a/b".into(), 1, 15, "unterminated string literal: expected a closing quote (')".into()),
            ("SELECT *\nFROM 'a'\nWHERE x = 'oops".into(), 3, 11, "unterminated string literal: expected a closing quote (')".into()),
            ("SELECT foo(1) FROM 'a'".into(), 1, 8, format!("unknown function 'foo': {supported}")),
            ("SELECT a FROM 'a' WHERE get(a, 1) = 2".into(), 1, 25, format!("unknown function 'get': {supported}")),
            ("SELECT * FROM 'a/#/b'".into(), 1, 18, "invalid topic filter 'a/#/b': '#' is allowed only as the last level".into()),
            ("SELECT * FROM 'a/#x'".into(), 1, 18, "invalid topic filter 'a/#x': '#' must be a whole level".into()),
            ("SELECT * FROM 'a/b+'".into(), 1, 19, "invalid topic filter 'a/b+': '+' must be a whole level".into()),
            ("SELECT * FROM 'it''s/a+'".into(), 1, 23, "invalid topic filter 'it's/a+': '+' must be a whole level".into()),
            ("SELECT * FROM ''".into(), 1, 15, "invalid topic filter '': expected a non-empty topic filter".into()),
            ("SELECT * FROM 'a' WHERE x = 1 garbage".into(), 1, 31, "expected end of statement, found 'garbage'".into()),
            ("SELECT * FROM 'a' extra".into(), 1, 19, "expected WHERE or end of statement, found 'extra'".into()),
            ("SELECT * FROM 'a' 'b'".into(), 1, 19, "expected WHERE or end of statement, found string 'b'".into()),
            ("SELECT * FROM 'a';".into(), 1, 18, "unexpected ';': expected end of statement (a rule is one statement, without a trailing semicolon)".into()),
            ("SELECT FROM 'a'".into(), 1, 8, "expected a select list (* or expressions), found 'FROM'".into()),
            ("SELECT".into(), 1, 7, "expected a select list (* or expressions), found end of input".into()),
            ("SELECT , a FROM 'b'".into(), 1, 8, "expected a select list (* or expressions), found ','".into()),
            ("SELECT a, FROM 'b'".into(), 1, 11, "expected an expression, found 'FROM'".into()),
            ("SELECT * FROM".into(), 1, 14, "expected a topic filter in single quotes, found end of input".into()),
            ("SELECT * FROM a".into(), 1, 15, "expected a topic filter in single quotes, found 'a'".into()),
            ("UPDATE x".into(), 1, 1, "expected SELECT, found 'UPDATE'".into()),
            ("".into(), 1, 1, "expected SELECT, found end of input".into()),
            ("SELECT a AS FROM 'x'".into(), 1, 13, "expected an alias name after AS, found 'FROM'".into()),
            ("SELECT (1 + 2 FROM 'a'".into(), 1, 15, "expected ')', found 'FROM'".into()),
            ("SELECT topic(1, 2) FROM 'a'".into(), 1, 8, "function topic takes 0 or 1 arguments (topic() or topic(n)), found 2".into()),
            ("SELECT timestamp(1) FROM 'a'".into(), 1, 8, "function timestamp takes no arguments (timestamp()), found 1".into()),
            ("SELECT topic(1 FROM 'a'".into(), 1, 16, "expected ',' or ')', found 'FROM'".into()),
            ("SELECT \"a\" FROM 'b'".into(), 1, 8, "unexpected character '\"': string literals use single quotes (')".into()),
            ("SELECT a # b FROM 'c'".into(), 1, 10, "unexpected character '#'".into()),
            ("SELECT a ! b FROM 'c'".into(), 1, 10, "unexpected character '!': expected '!=' (or use NOT)".into()),
            ("SELECT 'ééé' § FROM 'a'".into(), 1, 14, "unexpected character '§'".into()),
            ("SELECT 99999999999999999999 FROM 'a'".into(), 1, 8, "integer literal '99999999999999999999' is out of range: expected at most 9223372036854775807".into()),
            ("SELECT 1e999 FROM 'a'".into(), 1, 8, "decimal literal '1e999' is out of range".into()),
            ("SELECT 12abc FROM 'a'".into(), 1, 8, "invalid number '12abc': expected digits, a fraction or an exponent".into()),
            ("SELECT a[x] FROM 'a'".into(), 1, 10, "expected an array index (a non-negative integer), found 'x'".into()),
            ("SELECT a[1 FROM 'a'".into(), 1, 12, "expected ']', found 'FROM'".into()),
            ("SELECT a.1 FROM 'b'".into(), 1, 10, "expected an attribute name after '.', found '1'".into()),
            ("SELECT VALUE state FROM 'a'".into(), 1, 8, "SELECT VALUE is not supported: expected a select list (the output is always a JSON object)".into()),
            ("SELECT * FROM 'a' WHERE x >".into(), 1, 28, "expected an expression, found end of input".into()),
            ("SELECT * FROM 'a' WHERE AND".into(), 1, 25, "expected an expression, found 'AND'".into()),
            ("SELECT * FROM 'a' WHERE x = 1 = ".into(), 1, 33, "expected an expression, found end of input".into()),
            ("SELECT * FROM 'a' WHERE NOT".into(), 1, 28, "expected an expression, found end of input".into()),
        ];
        for (sql, line, column, message) in cases {
            let e = parse_error(&sql);
            assert_eq!(
                (e.line, e.column, e.message.as_str()),
                (line, column, message.as_str()),
                "{sql:?}"
            );
            assert_eq!(
                e.to_string(),
                format!("line {line}, column {column}: {message}")
            );
        }
    }

    #[test]
    fn long_tokens_are_cut_in_messages() {
        let long = "x".repeat(100);
        let e = parse_error(&format!("SELECT a {long} FROM 'b'"));
        assert_eq!(
            e.message,
            format!("expected FROM, found '{}…'", "x".repeat(40))
        );
    }

    #[test]
    fn nesting_is_bounded_with_a_clear_error() {
        let nested = |depth: usize| {
            format!(
                "SELECT {}1{} AS x FROM 'a'",
                "(".repeat(depth),
                ")".repeat(depth)
            )
        };
        assert_eq!(run(&nested(64), "a", None), Some(json!({"x": 1})));
        let message = "expression is nested too deeply: more than 64 levels of parentheses, NOT, unary '-' or function arguments";
        for depth in [65, 100_000] {
            let e = parse_error(&nested(depth));
            assert_eq!((e.line, e.column, e.message.as_str()), (1, 72, message));
        }
        let e = parse_error(&format!("SELECT {}true FROM 'a'", "NOT ".repeat(100_000)));
        assert_eq!((e.column, e.message.as_str()), (8 + 64 * 4, message));
        let e = parse_error(&format!("SELECT {}1 FROM 'a'", "-".repeat(100_000)));
        assert_eq!((e.column, e.message.as_str()), (72, message));
        let e = parse_error(&format!(
            "SELECT {}1{} FROM 'a'",
            "topic(".repeat(100_000),
            ")".repeat(100_000)
        ));
        // The 65th level is the argument of the 65th call, which starts with the 66th `topic`.
        assert_eq!((e.column, e.message.as_str()), (8 + 65 * 6, message));
        let e = match Template::parse(&format!("${{{}1}}", "(".repeat(100_000))) {
            Err(e) => e,
            Ok(t) => panic!("should not parse: {t:?}"),
        };
        assert_eq!((e.column, e.message.as_str()), (3 + 64, message));
    }

    #[test]
    fn operator_chains_are_bounded_with_a_clear_error() {
        let chain = |terms: usize| format!("SELECT 1{} AS x FROM 'a'", " + 1".repeat(terms));
        assert_eq!(run(&chain(255), "a", None), Some(json!({"x": 256})));
        let message = "expression is too complex: more than 256 levels of operators; expected a shorter expression";
        for terms in [256, 100_000] {
            let e = parse_error(&chain(terms));
            assert_eq!(
                (e.line, e.column, e.message.as_str()),
                (1, 4 * 256 + 6, message)
            );
        }
        let e = parse_error(&format!(
            "SELECT * FROM 'a' WHERE {}",
            vec!["a = 1"; 300].join(" OR ")
        ));
        assert_eq!(e.message, message);
    }

    // ---- precedence -------------------------------------------------------------------------

    #[test]
    fn precedence_and_associativity() {
        let cases: &[(&str, Value, Option<Value>)] = &[
            ("1 + 2 * 3", json!({}), Some(json!(7))),
            ("1 + 2 * 3 = 7", json!({}), Some(json!(true))),
            ("(1 + 2) * 3", json!({}), Some(json!(9))),
            ("10 - 4 - 3", json!({}), Some(json!(3))),
            ("100 / 10 / 5", json!({}), Some(json!(2))),
            ("2 * 3 % 4", json!({}), Some(json!(2))),
            ("-2 * 3", json!({}), Some(json!(-6))),
            ("2 - -3", json!({}), Some(json!(5))),
            ("1 + 2 > 2", json!({}), Some(json!(true))),
            ("1 < 2 = true", json!({}), Some(json!(true))),
            // NOT binds looser than comparisons and tighter than AND.
            (
                "NOT a = 1 AND b = 2",
                json!({"a": 2, "b": 2}),
                Some(json!(true)),
            ),
            (
                "NOT a = 1 AND b = 2",
                json!({"a": 1, "b": 3}),
                Some(json!(false)),
            ),
            // AND binds tighter than OR.
            (
                "a OR b AND c",
                json!({"a": true, "b": false, "c": false}),
                Some(json!(true)),
            ),
            (
                "(a OR b) AND c",
                json!({"a": true, "b": false, "c": false}),
                Some(json!(false)),
            ),
            (
                "a AND b OR c",
                json!({"a": false, "b": true, "c": true}),
                Some(json!(true)),
            ),
            ("NOT NOT a", json!({"a": true}), Some(json!(true))),
        ];
        for (expr, payload, expected) in cases {
            assert_eq!(value(expr, payload), *expected, "{expr} with {payload}");
        }
    }

    // ---- Undefined --------------------------------------------------------------------------

    #[test]
    fn a_missing_attribute_never_fires() {
        let payload = json!({"a": 1, "n": null, "o": {"x": 1}});
        for condition in [
            "missing > 1",
            "missing < 1",
            "missing = 1",
            "missing <> 1",
            "missing = missing",
            "NOT missing",
            "missing",
            "o.y.z = 1",
            "a.b = 1",
            "missing + 1 > 0",
            "-missing < 0",
            "missing = null",
            "true AND missing",
            "false OR missing",
            "missing OR false",
            "NOT (true AND missing)",
            "a[0] = 1",
            "o[0] = 1",
        ] {
            assert!(!fires(condition, &payload), "{condition} must not fire");
        }
        for condition in [
            "a = 1",
            "n = null",
            "NOT (false AND missing)",
            "NOT (missing AND false)",
            "true OR missing",
            "missing OR true",
            "o.x = 1",
            "n <> 1",
        ] {
            assert!(fires(condition, &payload), "{condition} must fire");
        }
    }

    #[test]
    fn undefined_is_omitted_from_the_output_but_null_is_kept() {
        let payload = json!({"a": 1, "n": null, "s": "x"});
        let sql = "SELECT missing, missing AS m, a + missing AS sum, n, n AS n2, a, \
                   s > 1 AS cmp, true AND missing AS both, 1 / 0 AS div FROM '#'";
        assert_eq!(
            run(sql, "t", Some(&payload)),
            Some(json!({"n": null, "n2": null, "a": 1}))
        );
    }

    #[test]
    fn where_fires_only_on_boolean_true() {
        let payload = json!({"flag": "true", "one": 1, "yes": true});
        assert!(!fires("flag", &payload));
        assert!(!fires("'true'", &payload));
        assert!(!fires("one", &payload));
        assert!(fires("yes", &payload));
        assert!(fires("flag AND true", &payload));
        assert!(fires("NOT 'FALSE'", &payload));
        assert_eq!(value("'TRUE' OR false", &payload), Some(json!(true)));
        assert_eq!(value("one AND true", &payload), None);
        assert_eq!(value("NOT one", &payload), None);
    }

    #[test]
    fn items_apply_left_to_right() {
        let payload = json!({"a": 1, "b": 2});
        assert_eq!(
            run("SELECT *, 5 AS a FROM '#'", "t", Some(&payload)),
            Some(json!({"a": 5, "b": 2}))
        );
        assert_eq!(
            run("SELECT *, missing AS a FROM '#'", "t", Some(&payload)),
            Some(json!({"b": 2}))
        );
        assert_eq!(
            run("SELECT 5 AS a, * FROM '#'", "t", Some(&payload)),
            Some(json!({"a": 1, "b": 2}))
        );
    }

    #[test]
    fn default_output_keys() {
        let payload = json!({"state": {"reported": {"heartbeat": 7}}, "arr": [1, 2]});
        let sql =
            "SELECT state.reported.heartbeat, arr[1], 1 + 1, topic(), 'x', * AS p, (arr[0]), \
                   TIMESTAMP(), clientid() FROM '#'";
        let now = now_ms();
        let out = parse(sql).evaluate(&ctx("t/1", Some(&payload), now));
        assert_eq!(
            out,
            Some(json!({
                "heartbeat": 7, "arr": 1, "_3": 2, "topic": "t/1", "_5": "x", "p": payload,
                "timestamp": now, "clientid": CLIENT,
            }))
        );
    }

    #[test]
    fn payloads_that_are_not_json_objects() {
        // Not JSON: attributes are Undefined, `*` adds nothing, functions still work.
        let sql =
            "SELECT *, topic(3) AS d, a AS a, * AS raw FROM '$aws/things/+/shadow/update/accepted'";
        assert_eq!(run(sql, SHADOW_TOPIC, None), Some(json!({"d": "pm-01"})));
        assert_eq!(run("SELECT * FROM '#' WHERE a > 1", "t", None), None);
        assert_eq!(
            run("SELECT * FROM '#' WHERE 1 = 1", "t", None),
            Some(json!({}))
        );
        // JSON, but not an object.
        let array = json!([1, 2]);
        assert_eq!(
            run("SELECT *, * AS raw, a FROM '#'", "t", Some(&array)),
            Some(json!({"raw": [1, 2]}))
        );
        let scalar = json!(42);
        assert_eq!(
            run("SELECT *, * AS raw FROM '#'", "t", Some(&scalar)),
            Some(json!({"raw": 42}))
        );
    }

    // ---- comparisons ------------------------------------------------------------------------

    #[test]
    fn comparisons_follow_the_aws_tables() {
        let payload = json!({
            "s": "141", "t": "abc", "i": 5, "d": 5.0, "big": 9007199254740993_i64,
            "x": [1, 2], "y": [1, 2.0], "z": [2, 1],
            "o1": {"a": 1, "b": [true]}, "o2": {"b": [true], "a": 1.0}, "o3": {"a": 1},
        });
        let cases: &[(&str, Option<bool>)] = &[
            ("'141' > 140", Some(true)),
            ("'140' > 140", Some(false)),
            ("s > 140", Some(true)),
            ("s >= 141", Some(true)),
            ("140 < s", Some(true)),
            ("'10' < '9'", Some(false)),
            ("'-5' < 0", Some(true)),
            ("'1.5e2' > 149", Some(true)),
            ("'1E-1' < 1", Some(true)),
            ("'abc' < 'abd'", None),
            ("t > 1", None),
            ("' 5' > 1", None),
            ("'5.' > 1", None),
            ("'+5' > 0", None),
            ("'1e+2' > 0", None),
            ("true > false", None),
            ("null < 1", None),
            ("x < z", None),
            ("i = d", Some(true)),
            ("5 = 5.0", Some(true)),
            ("i <= 5.5", Some(true)),
            ("big > 9007199254740992.0", Some(true)),
            ("big = 9007199254740992.0", Some(false)),
            ("9223372036854775807 < 9223372036854775808.0", Some(true)),
            (
                "-9223372036854775807 - 1 = -9223372036854775808.0",
                Some(true),
            ),
            ("'5' = 5", Some(false)),
            ("'5' <> 5", Some(true)),
            ("'abc' = t", Some(true)),
            ("'abc' <> t", Some(false)),
            ("'ABC' = t", Some(false)),
            ("true = true", Some(true)),
            ("true <> false", Some(true)),
            ("true = 'true'", Some(false)),
            ("null = null", Some(true)),
            ("null <> null", Some(false)),
            ("null = 0", Some(false)),
            ("x = y", Some(true)),
            ("x = z", Some(false)),
            ("x <> z", Some(true)),
            ("o1 = o2", Some(true)),
            ("o1 = o3", Some(false)),
            ("o1 = x", Some(false)),
            ("x = 1", Some(false)),
        ];
        for (expr, expected) in cases {
            assert_eq!(value(expr, &payload), expected.map(Value::Bool), "{expr}");
        }
    }

    // ---- arithmetic -------------------------------------------------------------------------

    #[test]
    fn integer_and_decimal_arithmetic() {
        let payload = json!({"i": 7, "d": 7.5, "s": "7", "t": "x", "b": true, "n": null});
        let cases: &[(&str, Option<Value>)] = &[
            ("2 + 3", Some(json!(5))),
            ("i * 2", Some(json!(14))),
            ("7 / 2", Some(json!(3))),
            ("-7 / 2", Some(json!(-3))),
            ("6 / 2", Some(json!(3))),
            ("7.0 / 2", Some(json!(3.5))),
            ("i / 2.0", Some(json!(3.5))),
            ("7 % 3", Some(json!(1))),
            ("-7 % 3", Some(json!(-1))),
            ("d % 2", Some(json!(1.5))),
            ("1.5 + 1.5", Some(json!(3.0))),
            ("d - 0.5", Some(json!(7.0))),
            ("0.1 * 3", Some(json!(0.30000000000000004))),
            ("s - 2", Some(json!(5.0))),
            ("s * '2'", Some(json!(14.0))),
            ("s / 2", Some(json!(3.5))),
            ("-s", Some(json!(-7.0))),
            ("-t", None),
            ("t - 1", None),
            ("b + 1", None),
            ("n + 1", None),
            ("b * 1", None),
            ("1 / 0", None),
            ("1 % 0", None),
            ("1.0 / 0", None),
            ("1 / 0.0", None),
            ("1.5 % 0", None),
            ("s / '0'", None),
            (
                "9223372036854775807 + 1",
                Some(json!(9_223_372_036_854_775_808.0_f64)),
            ),
            (
                "-9223372036854775807 - 2",
                Some(json!(-9_223_372_036_854_775_809.0_f64)),
            ),
            (
                "9223372036854775807 * 2",
                Some(json!(18_446_744_073_709_551_614.0_f64)),
            ),
            (
                "(-9223372036854775807 - 1) / -1",
                Some(json!(9_223_372_036_854_775_808.0_f64)),
            ),
            ("(-9223372036854775807 - 1) % -1", Some(json!(0))),
            (
                "-(-9223372036854775807 - 1)",
                Some(json!(9_223_372_036_854_775_808.0_f64)),
            ),
            ("1e308 * 10", None),
        ];
        for (expr, expected) in cases {
            let got = value(expr, &payload);
            assert_eq!(got, *expected, "{expr}");
            // Integer results keep integer form; decimal results stay decimals.
            if let (Some(Value::Number(g)), Some(Value::Number(e))) = (&got, expected) {
                assert_eq!(g.is_i64(), e.is_i64(), "{expr}: integer form");
            }
        }
    }

    #[test]
    fn plus_concatenates_when_a_string_takes_part() {
        let payload = json!({"s": "141", "o": {"k": [1]}});
        let cases: &[(&str, Option<Value>)] = &[
            ("'a' + 'b'", Some(json!("ab"))),
            ("s + 1", Some(json!("1411"))),
            ("1 + s", Some(json!("1141"))),
            ("'n=' + 1.5", Some(json!("n=1.5"))),
            ("'x' + true", Some(json!("xtrue"))),
            ("'x' + null", Some(json!("xnull"))),
            ("'x' + o", Some(json!("x{\"k\":[1]}"))),
            ("'x' + missing", None),
            ("'a' + 1 + 2", Some(json!("a12"))),
            ("1 + 2 + 'a'", Some(json!("3a"))),
            ("o + 1", None),
        ];
        for (expr, expected) in cases {
            assert_eq!(value(expr, &payload), *expected, "{expr}");
        }
    }

    // ---- functions --------------------------------------------------------------------------

    #[test]
    fn topic_function() {
        let payload = json!({"three": 3, "s": "3", "missing_not": 1});
        let cases: &[(&str, Option<Value>)] = &[
            ("topic()", Some(json!(SHADOW_TOPIC))),
            ("topic(1)", Some(json!("$aws"))),
            ("topic(3)", Some(json!("pm-01"))),
            ("topic(6)", Some(json!("accepted"))),
            ("topic(7)", None),
            ("topic(0)", None),
            ("topic(-1)", None),
            ("topic(9223372036854775807)", None),
            ("topic(1 + 2)", Some(json!("pm-01"))),
            ("topic(three)", Some(json!("pm-01"))),
            ("topic(s)", Some(json!("pm-01"))),
            ("topic('3.9')", Some(json!("pm-01"))),
            ("topic(2.6)", Some(json!("pm-01"))),
            ("topic('x')", None),
            ("topic(true)", None),
            ("topic(missing)", None),
            ("TOPIC(3)", Some(json!("pm-01"))),
        ];
        for (expr, expected) in cases {
            assert_eq!(
                value_at(expr, SHADOW_TOPIC, Some(&payload)),
                *expected,
                "{expr}"
            );
        }
        assert_eq!(value_at("topic(2)", "a//b", None), Some(json!("")));
    }

    #[test]
    fn timestamp_and_clientid_functions() {
        let now = now_ms();
        let statement =
            parse("SELECT timestamp() AS ts, clientid() AS c FROM '#' WHERE timestamp() = ts");
        let payload = json!({"ts": now});
        let context = ctx("t", Some(&payload), now);
        assert_eq!(
            statement.evaluate(&context),
            Some(json!({"ts": now, "c": CLIENT}))
        );
        let later = ctx("t", Some(&payload), now + 1);
        assert_eq!(statement.evaluate(&later), None);
        let other = Context {
            client_id: "n/a",
            ..context
        };
        assert_eq!(
            parse("SELECT clientid() FROM '#'").evaluate(&other),
            Some(json!({"clientid": "n/a"}))
        );
    }

    // ---- topics -----------------------------------------------------------------------------

    #[test]
    fn matches_topic_follows_mqtt() {
        let cases = [
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("a/+/c", "a/b/c/d", false),
            ("a/+/c", "a/c", false),
            ("a/+", "a/", true),
            ("+/+", "/x", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab/c", false),
            ("#", "anything/here", true),
            ("#", "$aws/things", false),
            ("+/things/#", "$aws/things/x", false),
            ("+", "$SYS", false),
            ("$aws/#", "$aws/things/x", true),
            ("$aws/things/+/shadow/update/accepted", SHADOW_TOPIC, true),
            (
                "$aws/things/+/shadow/update/accepted",
                "$aws/things/pm-01/shadow/update/rejected",
                false,
            ),
            ("a/b", "a/b", true),
            ("a/b", "a/B", false),
            ("a/b", "a/b/", false),
            ("a", "", false),
            ("#", "a/+", false),
            ("#", "a/#", false),
        ];
        for (filter, topic, expected) in cases {
            let statement = parse(&format!("SELECT * FROM '{filter}'"));
            assert_eq!(
                statement.matches_topic(topic),
                expected,
                "{filter} vs {topic:?}"
            );
            let payload = json!({});
            let out = statement.evaluate(&ctx(topic, Some(&payload), 0));
            assert_eq!(out.is_some(), expected, "evaluate {filter} vs {topic:?}");
        }
    }

    // ---- templates --------------------------------------------------------------------------

    #[test]
    fn templates_render() {
        let payload = json!({
            "heartbeat": 141, "name": "Bob", "obj": {"a": 1}, "arr": [1, "x"], "n": null,
            "state": {"reported": {"heartbeat": 99}},
        });
        let p = Some(&payload);
        let cases: &[(&str, &str)] = &[
            ("alerts/${topic(3)}", "alerts/pm-01"),
            ("${clientid()}-${heartbeat + 1}", "client-1-142"),
            ("x${missing}y", "xy"),
            ("${topic(99)}", ""),
            ("${name}", "Bob"),
            ("${'it''s'}", "it's"),
            ("${'}'}", "}"),
            ("${obj}|${arr}", "{\"a\":1}|[1,\"x\"]"),
            (
                "${1.5} ${7 / 2} ${true} ${null} ${n}",
                "1.5 3 true null null",
            ),
            ("${state.reported.heartbeat > 90}", "true"),
            ("${name + '-' + heartbeat}", "Bob-141"),
            ("cost $5 ${1}", "cost $5 1"),
            (
                "$$aws/things/${topic(3)}/shadow/update",
                "$$aws/things/pm-01/shadow/update",
            ),
            ("end$", "end$"),
            ("{braces} }", "{braces} }"),
            ("", ""),
            ("plain text", "plain text"),
            ("${ topic ( 3 ) }", "pm-01"),
            ("a\n${\nname\n}", "a\nBob"),
        ];
        for (template, expected) in cases {
            assert_eq!(render(template, SHADOW_TOPIC, p), *expected, "{template:?}");
        }
        assert_eq!(render("${topic(2)}/${a}", "x/y", None), "y/");
        let now = now_ms();
        let t = match Template::parse("${timestamp()}") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(t.render(&ctx("t", None, now)), now.to_string());
    }

    #[test]
    fn template_errors() {
        let supported =
            "expected one of the supported functions topic(), topic(n), timestamp() and clientid()";
        let cases: Vec<(&str, usize, usize, String)> = vec![
            (
                "alerts/${topic(3)",
                1,
                8,
                "unterminated '${': expected '}'".into(),
            ),
            ("${", 1, 1, "unterminated '${': expected '}'".into()),
            (
                "a/${'x}",
                1,
                5,
                "unterminated string literal: expected a closing quote (')".into(),
            ),
            ("${}", 1, 3, "expected an expression, found '}'".into()),
            ("${a b}", 1, 5, "expected '}', found 'b'".into()),
            ("${1 +}", 1, 6, "expected an expression, found '}'".into()),
            (
                "x\n${foo()}",
                2,
                3,
                format!("unknown function 'foo': {supported}"),
            ),
            ("${a;}", 1, 4, "expected '}', found ';'".into()),
            (
                "${\"a\"}",
                1,
                3,
                "unexpected character '\"': string literals use single quotes (')".into(),
            ),
        ];
        for (text, line, column, message) in cases {
            let e = match Template::parse(text) {
                Ok(t) => panic!("{text:?} should not parse, gave {t:?}"),
                Err(e) => e,
            };
            assert_eq!(
                (e.line, e.column, e.message.as_str()),
                (line, column, message.as_str()),
                "{text:?}"
            );
        }
    }

    // ---- properties -------------------------------------------------------------------------

    const TOKENS: &[&str] = &[
        "SELECT",
        "select",
        "FROM",
        "WHERE",
        "AS",
        "AND",
        "OR",
        "NOT",
        "TRUE",
        "FALSE",
        "NULL",
        "VALUE",
        "*",
        ",",
        ".",
        "(",
        ")",
        "[",
        "]",
        "+",
        "-",
        "/",
        "%",
        "=",
        "<>",
        "!=",
        "<",
        "<=",
        ">",
        ">=",
        ";",
        "'a/+/#'",
        "'#'",
        "'",
        "''",
        "'x'",
        "topic",
        "timestamp",
        "clientid",
        "(3)",
        "()",
        "a",
        "b.c",
        "x[0]",
        "1",
        "2.5",
        "1e5",
        "99999999999999999999",
        "${",
        "}",
        "$",
        "{",
        "\"",
        "!",
        "#",
        "é",
        "\n",
        "get",
        "'a/#/b'",
    ];

    const OPS: &[&str] = &[
        "+", "-", "*", "/", "%", "=", "<>", "!=", "<", "<=", ">", ">=", "AND", "OR",
    ];

    fn token_soup() -> impl Strategy<Value = String> {
        (
            vec(proptest::sample::select(TOKENS), 0..40),
            prop_oneof![Just(" "), Just(""), Just("\n")],
        )
            .prop_map(|(tokens, sep)| tokens.join(sep))
    }

    fn expr_sql() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            "[a-c](\\.[a-c]){0,2}(\\[[0-2]\\])?",
            (0i64..1000).prop_map(|i| i.to_string()),
            Just(i64::MAX.to_string()),
            "[0-9]{1,3}\\.[0-9]{1,2}(e-?[0-9])?",
            "[a-c0-9'.-]{0,4}".prop_map(|s| format!("'{}'", s.replace('\'', "''"))),
            Just("true".to_string()),
            Just("FALSE".to_string()),
            Just("null".to_string()),
            Just("topic()".to_string()),
            Just("timestamp()".to_string()),
            Just("clientid()".to_string()),
        ];
        leaf.prop_recursive(4, 32, 2, |inner| {
            prop_oneof![
                (inner.clone(), proptest::sample::select(OPS), inner.clone())
                    .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
                inner.clone().prop_map(|a| format!("(NOT {a})")),
                inner.clone().prop_map(|a| format!("-{a}")),
                inner.prop_map(|a| format!("topic({a})")),
            ]
        })
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-c0-9.-]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map("[a-c]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-c$/+#]{0,10}",
            Just(SHADOW_TOPIC.to_string()),
            Just("a/b/c".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn parsing_arbitrary_text_never_panics(text in "\\PC{0,120}", any_text in any::<String>()) {
            for t in [&text, &any_text] {
                let _ = Statement::parse(t);
                let _ = Template::parse(t);
            }
        }

        #[test]
        fn parsing_token_soup_never_panics(soup in token_soup()) {
            for sql in [
                soup.clone(),
                format!("SELECT {soup}"),
                format!("SELECT * FROM '#' WHERE {soup}"),
            ] {
                if let Ok(statement) = Statement::parse(&sql) {
                    let payload = json!({"a": 1, "b": {"c": "2"}});
                    let _ = statement.evaluate(&ctx("a/b", Some(&payload), 0));
                }
            }
            for text in [soup.clone(), format!("x/${{{soup}}}/y")] {
                if let Ok(template) = Template::parse(&text) {
                    let _ = template.render(&ctx("a/b", None, 0));
                }
            }
        }

        #[test]
        fn generated_statements_parse_and_evaluate(
            selected in expr_sql(),
            condition in expr_sql(),
            payload in json_value(),
            topic in topic(),
            is_json in any::<bool>(),
        ) {
            let payload = is_json.then_some(&payload);
            let context = ctx(&topic, payload, crate::clock::now_ms());
            let always = format!("SELECT *, {selected} AS out, {selected} FROM '#' WHERE {condition} OR true");
            let statement = Statement::parse(&always);
            prop_assert!(statement.is_ok(), "{} did not parse: {:?}", always, statement);
            if let Ok(statement) = statement {
                let out = statement.evaluate(&context);
                let should_fire = filter_matches("#", &topic);
                prop_assert_eq!(out.is_some(), should_fire);
                if let Some(out) = out {
                    prop_assert!(out.is_object());
                }
            }
            let filtered = format!("SELECT {selected} FROM '$aws/things/+/#' WHERE {condition}");
            let statement = Statement::parse(&filtered);
            prop_assert!(statement.is_ok(), "{} did not parse: {:?}", filtered, statement);
            if let Ok(statement) = statement {
                let _ = statement.evaluate(&context);
            }
            let template = Template::parse(&format!("r/${{{selected}}}/${{{condition}}}"));
            prop_assert!(template.is_ok());
            if let Ok(template) = template {
                prop_assert!(template.render(&context).starts_with("r/"));
            }
        }

        #[test]
        fn text_without_dollar_renders_as_is(text in "[^$]{0,60}") {
            let template = Template::parse(&text);
            prop_assert!(template.is_ok());
            if let Ok(template) = template {
                prop_assert_eq!(template.render(&ctx("t", None, 0)), text);
            }
        }

        #[test]
        fn hash_matches_every_valid_non_dollar_topic(topic in "[a-c/ $]{1,12}") {
            let statement = parse("SELECT * FROM '#'");
            prop_assert_eq!(statement.matches_topic(&topic), !topic.starts_with('$'));
        }

        #[test]
        fn select_star_copies_object_payloads(payload in json_value()) {
            let out = run("SELECT * FROM '#'", "t", Some(&payload));
            let expected = match &payload {
                Value::Object(_) => payload.clone(),
                _ => json!({}),
            };
            prop_assert_eq!(out, Some(expected));
        }
    }
}
